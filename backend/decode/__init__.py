"""Decoding: one batched interface (protocol), the eager and fast decoders, and the batching thread."""

from __future__ import annotations

from typing import Optional

import torch

from .eager import EagerBatchDecoder, PrefixOf

# Eager rows decoded together by default: enough for compare and a few server clients on a CPU.
CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 64
FAST_DEFAULT_ROWS = 2
FAST_CACHE_SLOTS = 8192  # the fast decoder's static cache (prefix + conversation)
KV_SHARE_OF_FREE_MEMORY = 0.6  # of the GPU memory free when the decoder is made, for the eager batch cache


def make_batch_decoder(model, engine: str = "auto", prefix_of: PrefixOf = lambda name: None,
                       max_batch: Optional[int] = None):
    """The decoder for ``engine``: "fast" (the CUDA fast path: packed weights, one graph a step for
    every row), "serial" (the older one-row fast decoder), "eager" (batched torch on any device), or
    "auto" (fast where its kernels run, else eager). ``max_batch`` None: 2 rows on the fast path
    (a chat and compare; its cache is allocated for every row up front), as many as fit elsewhere."""
    from ..fast_decode import available, FastDecoder

    if engine not in ("auto", "fast", "serial", "eager"):
        raise ValueError(f"engine must be auto, fast or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    if engine == "serial":
        from .fast import SerialFastDecoder

        cache = min(model.config.seq_length, FAST_CACHE_SLOTS)
        return SerialFastDecoder(FastDecoder(model, max_seq_len=cache, weights="same"), prefix_of)
    if engine == "fast" or (engine == "auto" and on_cuda and available()):
        from .fast_batch import BatchFastDecoder

        return BatchFastDecoder(model, prefix_of, max_batch=max_batch or FAST_DEFAULT_ROWS,
                                context_length=min(model.config.seq_length, FAST_CACHE_SLOTS))
    budget = None
    if on_cuda:
        budget = int(torch.cuda.mem_get_info(model.get_input_embeddings().weight.device)[0] * KV_SHARE_OF_FREE_MEMORY)
    return EagerBatchDecoder(model, prefix_of, max_batch=max_batch or (CUDA_MAX_BATCH if on_cuda else CPU_MAX_BATCH),
                             kv_budget_bytes=budget)
