"""The CUDA fast decoder, kept importable from here: it lives in ``backend.decode.fast_decoder`` (with
``fast_step``, ``fast_prefill``, ``fast_sampler``) and its kernels in ``backend/kernels/decode_kernels.py``."""

from __future__ import annotations

from .decode.fast_decoder import WEIGHT_MODES, FastDecoder, available
from .decode.fast_prefill import PREFILL_MAX_BUCKET, PREFILL_MAX_GRAPHS, PREFILL_MIN_BUCKET
from .decoding import EagerDecoder

__all__ = ["FastDecoder", "available", "make_decoder", "WEIGHT_MODES", "PREFILL_MIN_BUCKET", "PREFILL_MAX_BUCKET",
           "PREFILL_MAX_GRAPHS"]


def make_decoder(model, engine: str = "auto", weights: str = "same", max_seq_len: int = 8192):
    """The decoder the chat engine should use: "fast", "eager", or "auto" (fast on CUDA, eager on CPU)."""
    if engine not in ("auto", "fast", "eager"):
        raise ValueError(f"engine must be auto, fast or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    if engine == "eager" or (engine == "auto" and not (on_cuda and available())):
        return EagerDecoder(model)
    return FastDecoder(model, max_seq_len=max_seq_len, weights=weights)
