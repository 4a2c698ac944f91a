"""Where one row's captured decode step spends its time: each part's cost inside the step, found by leaving it out.

    python bench/ablate_one_row_step.py --model DIR [--quantization 8bit|4bit] [--context 128,1024]

The engine is loaded and warmed up as a user's is (``ChatEngine.load``, ``warm_up``: this card's tuned tiles); then
row 0 of its decoder is put at each context length and its step (``_step_math(1)``: the fused one-row step where it
applies, else the general step) is captured whole and with one part left out at a time: the attention (one kernel a
layer), the rotary kernel (general step only), each linear kind across the layers, the greedy pick. The
full step's time less an ablated step's is that part's cost in the step, launch boundary included: a kernel timed
alone does not show how its start overlaps the one before (programmatic dependent launch) or what its neighbours
leave in L2; ``attention_body`` leaves the attention's launch in place (an empty kernel of its grid). Variants: the
tuned quantized tiles with and without their first weight tile asked for before the wait on the kernel ahead
(``prefetch``). Then the attention with 1 to 16 splits a (row, group), at each of ``--attention-tiles`` (slots a
loop step x warps). Ablated graphs compute wrong tokens; only their times are read. One JSON line per figure, with the
card, the command and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PARTS = ("attention", "attention_body", "rotary", "qkv", "dense", "fc1", "fc2", "output", "pick")


def step_ms(decoder, reps: int = 3) -> float:
    """Median over ``reps`` timings of 50 replays of row 0's step, captured as the decoder captures it."""
    import torch
    from check_grad_kernel import replay_ms

    from backend.cuda_streams import warm_and_capture

    graph, _ = warm_and_capture(lambda: decoder._step_math(1, feed=False), decoder.device, None)
    times = [replay_ms(graph, 50) for _ in range(reps)]
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


@contextlib.contextmanager
def left_out(part: str):
    """Run the step with ``part`` replaced by nothing (a cached output of the real call, made before the capture)."""
    from backend.decode import batch_linear, fast_batch, one_row_step

    saved = []

    def patch(owner, name, fake):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fake)

    cache: dict = {}

    def skipping(real, key_of):
        def fake(*args, **kw):
            key = key_of(*args, **kw)
            if key is None:
                return real(*args, **kw)
            if key not in cache:  # the warm-up run, outside the capture
                cache[key] = real(*args, **kw)
            return kw.get("out") if kw.get("out") is not None else cache[key]
        return fake

    if part == "attention":
        for owner in (one_row_step, fast_batch):
            patch(owner, "decode_attention", skipping(owner.decode_attention, lambda *a, **k: "attention"))
    elif part == "attention_body":  # an empty kernel of the attention's grid in its place: what is left is its launch
        for owner in (one_row_step, fast_batch):
            patch(owner, "decode_attention", empty_attention)
    elif part == "rotary":
        patch(fast_batch, "rope_cache_write", skipping(fast_batch.rope_cache_write, lambda *a, **k: "rotary"))
    elif part == "pick":
        patch(one_row_step, "pick_token", lambda *a, **k: None)
        patch(fast_batch, "greedy_pick", skipping(fast_batch.greedy_pick, lambda *a, **k: "pick"))
    else:
        cls = batch_linear.BatchLinear
        mine = lambda lin, *a, **k: ("linear", id(lin)) if lin.kind == part else None  # noqa: E731
        patch(cls, "__call__", skipping(cls.__call__, mine))
        patch(cls, "gemv_row", skipping(cls.gemv_row, mine))
    try:
        yield
    finally:
        for owner, name, real in reversed(saved):
            setattr(owner, name, real)


@functools.cache
def _empty_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def empty(PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
    return empty


def empty_attention(q, k_cache, *args, out=None, workspace=None, pdl=False, **kw):
    """A kernel that does nothing in ``decode_attention``'s grid, launched as it is (programmatic dependent launch:
    the dependents released, then the wait on the kernel ahead); returns ``out`` as it was."""
    splits, warps = (workspace.num_splits, workspace.num_warps) if workspace is not None else (1, 8)
    _empty_kernel()[(q.shape[0], k_cache.shape[1], splits)](PDL=pdl, num_warps=warps,
                                                            **({"launch_pdl": True} if pdl else {}))
    return out


def use_attention_tile(decoder, splits: int, block_t: int, num_warps: int, alone_slots: int = 0) -> None:
    """Row 0's attention with ``splits`` chunks a (row, group), ``block_t`` slots a loop step, ``num_warps``, rows of
    up to ``alone_slots`` slots done by one program."""
    from backend.kernels.attention_batch import attention_workspace

    ws = attention_workspace(1, decoder.heads, decoder.groups, decoder.head_dim, decoder.device, num_splits=splits,
                             block_t=block_t, num_warps=num_warps, alone_slots=alone_slots)
    if decoder._one_row_step is not None:
        decoder._one_row_step.workspace = ws
    decoder._workspaces[1] = ws


def prefetch_variant(decoder, prefetch: bool) -> list[str]:
    """Every quantized kind's tuned tile (int8 GEMV, 4-bit words kernel) with ``prefetch`` set (its first weight tile
    asked for before the wait on the kernel ahead); the kinds changed."""
    from dataclasses import replace

    from backend.decode import one_row_tuning
    from backend.kernels.gemv_4bit import QuantLinearConfig
    from backend.kernels.int8_gemv import GemvConfig

    changed = {}
    for kind, lins in one_row_tuning.linears_by_kind(decoder).items():
        cfg = lins[0].row_config
        int8 = isinstance(cfg, GemvConfig) and lins[0].q is not None
        words = isinstance(cfg, QuantLinearConfig) and cfg.kernel == "words"
        if (int8 or words) and cfg.prefetch != prefetch:
            changed[kind] = replace(cfg, prefetch=prefetch)
    one_row_tuning.apply(decoder, changed)
    return sorted(changed)


def variants(decoder, context: int, full: float, tuned: dict, emit) -> None:
    """The step with the tuned tiles' first weight tile asked for early (``prefetch``) on every quantized kind and
    off on every one; gain_ms: the variant's time less the step's as it runs."""
    from backend.decode import one_row_tuning

    for name, prefetch in (("without_prefetch", False), ("with_prefetch", True)):
        changed = prefetch_variant(decoder, prefetch)  # the tuned tiles, their first weight tile early or not
        if changed:
            ms = step_ms(decoder)
            emit(what="variant", context=context, name=name, kinds=changed, ms=round(ms, 4),
                 gain_ms=round(ms - full, 4))
            one_row_tuning.apply(decoder, tuned)


def place_row(decoder, context: int) -> None:
    """Row 0 decodes the token at position ``context - 1`` of the base model; every other row idles."""
    decoder.positions.fill_(-1)
    decoder.positions[0] = context - 1
    decoder.prefix_lens.zero_()
    decoder.tokens.fill_(min(100, decoder.embedding.shape[0] - 1))


def main() -> None:
    import torch

    from backend.decode import one_row_tuning
    from backend.engine import ChatEngine
    from backend.kernels.attention_batch import attention_workspace
    from bench_engine import copy_bandwidth, json_lines, linear_bytes, step_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--context", default="128,1024")
    parser.add_argument("--splits", default="1,2,4,8,16")
    parser.add_argument("--attention-tiles", default="64x8", help="slots a loop step x warps, e.g. 64x8,32x4,16x4")
    args = parser.parse_args()
    emit = json_lines(quantization=args.quantization)
    bandwidth = copy_bandwidth()
    engine = ChatEngine.load(args.model, quantization=args.quantization, engine="fast", max_batch=2)
    engine.warm_up()
    dec = engine.decoder
    bound_ms = 1e3 * step_bytes(dec) / bandwidth
    kinds = {"qkv": dec.layers[0].qkv, "dense": dec.layers[0].dense, "fc1": dec.layers[0].up, "fc2": dec.layers[0].down}
    part_bytes = {k: len(dec.layers) * linear_bytes(lin) for k, lin in kinds.items()}
    part_bytes["output"] = linear_bytes(dec.output)
    step = dec._one_row_step
    tuned = {k: lins[0].row_config for k, lins in one_row_tuning.linears_by_kind(dec).items() if lins[0].row_config}
    splits_default = (step.workspace if step is not None else attention_workspace(1, dec.heads, dec.groups,
                                                                                   dec.head_dim, dec.device)).num_splits
    emit(what="tiles", one_row={k: str(lin.row_config) for k, lin in dict(kinds, output=dec.output).items()})
    emit(what="setup", fused_step=step is not None, bound_ms=round(bound_ms, 3),
         bandwidth_tb_s=round(bandwidth / 1e12, 2), splits=splits_default)
    with engine.batcher.step_lock, torch.inference_mode():
        for context in [int(c) for c in args.context.split(",")]:
            place_row(dec, context)
            full = step_ms(dec)
            emit(what="step", context=context, ms=round(full, 4), pct_of_bound=round(100 * bound_ms / full, 1))
            variants(dec, context, full, tuned, emit)
            for part in PARTS:
                if part == "rotary" and dec._one_row_step is not None:
                    continue
                with left_out(part):
                    ms = step_ms(dec)
                cost = full - ms
                extra = {}
                if part in part_bytes and cost > 0:
                    extra = dict(bytes_gb=round(part_bytes[part] / 1e9, 3),
                                 in_step_tb_s=round(part_bytes[part] / (cost * 1e-3) / 1e12, 2),
                                 pct_of_bound=round(100 * part_bytes[part] / bandwidth / (cost * 1e-3), 1))
                emit(what="left_out", context=context, part=part, step_ms=round(ms, 4), cost_ms=round(cost, 4), **extra)
            running = (step.workspace if step is not None else None, dec._workspaces.get(1))
            for block_t, warps in [tuple(int(v) for v in t.split("x")) for t in args.attention_tiles.split(",")]:
                for splits in [int(s) for s in args.splits.split(",")]:
                    use_attention_tile(dec, splits, block_t, warps)
                    emit(what="splits", context=context, splits=splits, block_t=block_t, num_warps=warps,
                         ms=round(step_ms(dec), 4))
            if step is not None:  # back to the workspaces the step runs with
                step.workspace = running[0]
            dec._workspaces[1] = running[1]
    engine.close()


if __name__ == "__main__":
    main()
