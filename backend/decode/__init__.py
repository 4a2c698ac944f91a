"""Decoding: one batched interface (protocol), the eager and fast decoders, and the batching thread."""

from __future__ import annotations

from typing import Optional

from ..gpu_memory import free_bytes
from .eager import EagerBatchDecoder, PrefixOf

# Eager rows decoded together by default: enough for compare and a few server clients on a CPU.
CPU_MAX_BATCH = 8
CUDA_MAX_BATCH = 64
CHAT_CACHE_SHARE = 0.25  # of the free GPU memory, for a one- or two-row fast cache
FAST_CACHE_SLOTS = 8192  # context per row when the batched fast decoder holds more than two rows
KV_SHARE_OF_FREE_MEMORY = 0.6  # of the GPU memory free when the decoder is made, for the eager batch cache


def make_batch_decoder(model, engine: str = "auto", prefix_of: PrefixOf = lambda name: None,
                       max_batch: Optional[int] = None, context_length: Optional[int] = None):
    """The decoder for ``engine``: "fast" (CUDA: one row at a time through the one-row fast decoder when
    ``max_batch`` is 1 or None and the weights are 8 or 16-bit, else the batched fast decoder), "serial" (always the one-row decoder),
    "eager" (batched torch on any device), or "auto" (fast where its kernels run, else eager).
    ``context_length``: tokens a row holds at most on the batched fast decoder (evaluation knows its longest
    prompt + reply, and fits more rows in the memory); None: the model's, or FAST_CACHE_SLOTS beyond 2 rows.

    Measured on an H200 (BENCHMARKS.md): one row decodes 2.4x faster on the one-row decoder (its GEMVs
    and sampler are tuned into one graph), and a compare there alternates two rows at the same total
    rate; the batched decoder wins from a few concurrent rows up (a server, evaluation)."""
    from ..fast_decode import available, FastDecoder, cache_slots, plain_rope

    if engine not in ("auto", "fast", "serial", "eager"):
        raise ValueError(f"engine must be auto, fast or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    fast = on_cuda and available()
    # the one-row decoder knows the plain rotary only, and would widen 4-bit weights to an int8 copy
    one_row = (max_batch or 1) == 1 and plain_rope(model.config) and not _has_4bit_weights(model)
    if engine == "serial" or (engine in ("auto", "fast") and fast and one_row):
        from .fast import SerialFastDecoder

        return SerialFastDecoder(FastDecoder(model, max_seq_len=cache_slots(model), weights="same"), prefix_of)
    if engine == "fast" or (engine == "auto" and fast):
        from .fast_batch import BatchFastDecoder

        # a chat or a compare gets the model's whole context from a quarter of the free memory (a small card
        # still trains beside it); many rows share the memory at 8192 tokens each
        if (max_batch or 1) <= 2:
            return BatchFastDecoder(model, prefix_of, max_batch=max_batch or 1, context_length=model.config.seq_length,
                                    cache_share=CHAT_CACHE_SHARE)
        return BatchFastDecoder(model, prefix_of, max_batch=max_batch,
                                context_length=min(model.config.seq_length, context_length or FAST_CACHE_SLOTS))
    budget = None
    if on_cuda:
        budget = int(free_bytes(model.get_input_embeddings().weight.device) * KV_SHARE_OF_FREE_MEMORY)
    return EagerBatchDecoder(model, prefix_of, max_batch=max_batch or (CUDA_MAX_BATCH if on_cuda else CPU_MAX_BATCH),
                             kv_budget_bytes=budget)


def _has_4bit_weights(model) -> bool:
    """NF4 (bitsandbytes) or the int4 release: weights the batched decoder reads as stored."""
    from ..int8_linear import is_quantized_module

    return any(is_quantized_module(m) == "4bit" for m in model.transformer.encoder.modules())
