"""Decoding: one batched interface (protocol), the eager and fast decoders, and the batching thread."""

from __future__ import annotations

from typing import Optional

from ..gpu_memory import free_bytes
from .eager import EagerBatchDecoder, PrefixOf

# Eager rows decoded together by default: enough for compare and a few server clients on a CPU.
CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 64
CHAT_ROWS = 2  # the fast decoder's rows unless told: a chat's reply, or a compare's two columns in one batch
CHAT_CACHE_SHARE = 0.25  # of the free GPU memory, for a one- or two-row fast cache
FAST_CACHE_SLOTS = 8192  # context per row when the batched fast decoder holds more than two rows
KV_SHARE_OF_FREE_MEMORY = 0.6  # of the GPU memory free when the decoder is made, for the eager batch cache


def make_batch_decoder(model, engine: str = "auto", prefix_of: PrefixOf = lambda name: None,
                       max_batch: Optional[int] = None, context_length: Optional[int] = None):
    """The decoder for ``engine``: "fast" (CUDA: the batched fast decoder), "eager" (batched torch on any device),
    "auto" (fast where its kernels run, else eager), or "serial" (the one-row fast decoder, one reply at a time:
    kept for benchmarks' A/B against the batched decoder's one-row step).
    ``max_batch``: rows decoded together; None: CHAT_ROWS on the fast path (a chat's reply, and a compare's two
    columns in one batch), CPU_MAX_BATCH / CUDA_MAX_BATCH on the eager one.
    ``context_length``: tokens a row holds at most on the batched fast decoder (evaluation knows its longest
    prompt + reply, and fits more rows in the memory); None: the model's, or FAST_CACHE_SLOTS beyond CHAT_ROWS."""
    from ..fast_decode import available, FastDecoder, cache_slots

    if engine not in ("auto", "fast", "serial", "eager"):
        raise ValueError(f"engine must be auto, fast, serial or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    if engine == "serial":
        from .fast import SerialFastDecoder

        return SerialFastDecoder(FastDecoder(model, max_seq_len=cache_slots(model), weights="same"), prefix_of)
    if engine == "fast" or (engine == "auto" and on_cuda and available()):
        from .fast_batch import BatchFastDecoder

        # a chat and a compare get the model's whole context from a quarter of the free memory (a small card
        # still trains beside it); many rows share the memory at FAST_CACHE_SLOTS tokens each
        rows = max_batch or CHAT_ROWS
        if rows <= CHAT_ROWS:
            return BatchFastDecoder(model, prefix_of, max_batch=rows, context_length=model.config.seq_length,
                                    cache_share=CHAT_CACHE_SHARE)
        return BatchFastDecoder(model, prefix_of, max_batch=rows,
                                context_length=min(model.config.seq_length, context_length or FAST_CACHE_SLOTS))
    budget = None
    if on_cuda:
        budget = int(free_bytes(model.get_input_embeddings().weight.device) * KV_SHARE_OF_FREE_MEMORY)
    return EagerBatchDecoder(model, prefix_of, max_batch=max_batch or (CUDA_MAX_BATCH if on_cuda else CPU_MAX_BATCH),
                             kv_budget_bytes=budget)
