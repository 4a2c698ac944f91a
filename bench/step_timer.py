"""Time one P-Tuning v2 optimizer step on random tokens, as training runs it (moved out of backend/training:
bench-only code lives in bench/). ``bench_train.py`` drives the real ``train_cli.py train`` instead; this
isolates the step for kernel and graph comparisons."""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from backend.training.memory import memory_gb, release
from backend.training.step import PrefixStep, model_device, new_prefix_encoder


class StepBenchmark(NamedTuple):
    ms_per_step: float
    peak_gpu_gb: Optional[float]


def benchmark_step(model, batch_size: int = 1, seq_len: int = 192, pre_seq_len: int = 128, steps: int = 10,
                   warmup: int = 2, gradient_checkpointing: bool = False, prefix_projection: bool = False,
                   weight_only_int8: bool = True, cuda_graphs: bool = True, recompute_mlp: bool = True) -> StepBenchmark:
    """Milliseconds per optimizer step (forward, backward, clip, AdamW) of ``batch_size`` x ``seq_len`` random
    tokens, and the peak GPU memory in GB (None on the CPU)."""
    device = model_device(model)
    encoder = new_prefix_encoder(model.config, pre_seq_len, prefix_projection, device, seed=0)
    trainer = PrefixStep(model, encoder, 2e-2, total_steps=warmup + steps, seed=0, weight_only_int8=weight_only_int8,
                         cuda_graphs=cuda_graphs, recompute_mlp=recompute_mlp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.padded_vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    weights = torch.full((batch_size,), 1.0 / (batch_size * (seq_len - 1)))
    restore = model.transformer.encoder.gradient_checkpointing
    model.transformer.encoder.gradient_checkpointing = gradient_checkpointing
    encoder.train()
    cuda = device.type == "cuda"
    if cuda:  # the peak includes warm-up and graph capture: a real run goes through them too
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def one(i: int) -> None:
        trainer.backward(batch, list(range(i * batch_size, (i + 1) * batch_size)), weights)
        trainer.step()

    try:
        for i in range(warmup):
            one(i)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            one(warmup + i)
        if cuda:
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - start) * 1000 / max(1, steps)
        peak = memory_gb(device)
    finally:
        model.transformer.encoder.gradient_checkpointing = restore
        trainer.drop_graphs()  # give the graphs' memory back before whatever runs next
        release(device)
    return StepBenchmark(ms, peak)
