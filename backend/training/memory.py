"""How many examples go through the model at once (``micro_batch_size``), whether the MLP activations are
kept or recomputed in the backward, and out-of-memory sentences.

``auto`` measures what one example of the longest shape costs (a forward and backward without graphs),
then takes the largest divisor of the step's examples whose cost fits the free GPU memory (within
``torch.cuda.set_per_process_memory_fraction`` when one is set) with a margin; a run that still runs out
of memory halves it and redoes the step. On the CPU it is a fixed default.
"""

from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

from ..gpu_memory import free_bytes
from ..service import BackendError

log = logging.getLogger(__name__)

CPU_MICRO_BATCH = 8
MARGIN = 1.35  # CUDA graph pools and allocator fragmentation over the measured eager cost

OOM_HINT = (
    "try --quantization 4bit, smaller --max-source-length/--max-target-length or --pre-seq-len, "
    "a smaller --micro-batch-size, or --gradient-checkpointing"
)


def memory_gb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def smaller_micro_batch(current: int, rows: int) -> Optional[int]:
    """The next smaller divisor of ``rows`` (None below 1)."""
    smaller = [d for d in divisors_desc(rows) if d < current]
    return smaller[0] if smaller else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def example_bytes(trainer, plan) -> int:
    """GPU bytes one example of the longest shape adds at its peak (a forward and backward without graphs,
    with the trainer's ``recompute_mlp`` as set); raises ``not_even_one`` when not even that fits."""
    device = trainer.device
    from ..data import collate_train

    probe = plan.micro_batches(0, 1)[0]
    batch = collate_train([plan.features[0]])  # features are padded to the longest shape a step can have
    release(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graphs, trainer.cuda_graphs = trainer.cuda_graphs, False
    try:
        trainer.backward(batch, probe.slots, probe.row_weights)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is expected here
        from .step import is_oom

        if not is_oom(err):
            raise
        release(device)
        raise not_even_one(device, len(plan.features[0]["input_ids"])) from None
    finally:
        trainer.cuda_graphs = graphs
        trainer.zero_grad()
    per_example = max(1, torch.cuda.max_memory_allocated(device) - base)
    release(device)
    return per_example


def fit_step(trainer, plan, rows: int, micro_batch: Optional[int], recompute_mlp: Optional[bool]) -> tuple[int, bool]:
    """The micro-batch (None: auto) and MLP recompute (None: auto) a run uses, set on ``trainer`` too.

    Auto recompute keeps the MLP activations (about 13% faster a step) unless recomputing them lets a larger
    micro-batch fit; an auto micro-batch is the largest divisor of ``rows`` (this rank's examples per step)
    that fits. Raises ``not_even_one`` when not even one example does."""
    device = trainer.device
    if device.type != "cuda" or (micro_batch is not None and recompute_mlp is not None):
        trainer.recompute_mlp = bool(recompute_mlp)  # the CPU has memory to keep them
        fixed = micro_batch or max(d for d in divisors_desc(rows) if d <= CPU_MICRO_BATCH)
        return fixed, trainer.recompute_mlp
    fits = {}
    for recompute in ([recompute_mlp] if recompute_mlp is not None else [False, True]):
        trainer.recompute_mlp = recompute
        try:
            per_example = example_bytes(trainer, plan)
        except BackendError:
            if recompute is not True and recompute_mlp is None:
                continue  # recomputing takes less: try that
            raise
        budget = free_bytes(device)
        fits[recompute] = (micro_batch if micro_batch * per_example * MARGIN <= budget else None) if micro_batch \
            else pick_micro_batch(rows, per_example, budget)
        log.info("recompute_mlp=%s: %.2f GB per example, %.2f GB free, micro-batch %s", recompute,
                 per_example / 1e9, budget / 1e9, fits[recompute])
    best = best_fit(fits)
    if best is None:  # an explicit micro-batch that does not fit either way: run it recomputing, an OOM says the rest
        trainer.recompute_mlp = recompute_mlp is not False
        if micro_batch is None:
            raise not_even_one(device, len(plan.features[0]["input_ids"]))
        return micro_batch, trainer.recompute_mlp
    chosen, trainer.recompute_mlp = best
    return chosen, trainer.recompute_mlp


def best_fit(fits: dict) -> Optional[tuple[int, bool]]:
    """(micro-batch, recompute) from {recompute: the micro-batch that fits or None}: the larger micro-batch, on a
    tie keeping the activations (fewer FLOPs); None when nothing fits."""
    options = [(m, not recompute, recompute) for recompute, m in fits.items() if m is not None]
    if not options:
        return None
    chosen, _, recompute = max(options)
    return chosen, recompute


def pick_micro_batch(rows: int, per_example: int, budget: int) -> Optional[int]:
    """The largest divisor of ``rows`` whose examples (``per_example`` bytes each, with MARGIN) fit in
    ``budget`` bytes; None when not even one does."""
    fitting = [d for d in divisors_desc(rows) if d * per_example * MARGIN <= budget]
    return fitting[0] if fitting else None


def not_even_one(device: torch.device, width: int) -> BackendError:
    free = free_bytes(device) / 1e9 if device.type == "cuda" else 0.0
    return BackendError(
        f"one example of {width} tokens does not fit in the GPU's free memory ({free:.1f} GB) even alone; "
        f"{OOM_HINT.replace(', a smaller --micro-batch-size', '')}."
    )
