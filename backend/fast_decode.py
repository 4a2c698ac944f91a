"""The CUDA fast decoder, kept importable from here: it lives in ``backend.decode.fast_decoder`` (with
``fast_step``, ``fast_prefill``, ``fast_sampler``) and its kernels in ``backend/kernels/decode_kernels.py``."""

from __future__ import annotations

from typing import Optional

from .decode.fast_decoder import WEIGHT_MODES, FastDecoder, available, cache_slots, plain_rope
from .decode.fast_prefill import PREFILL_MAX_BUCKET, PREFILL_MAX_GRAPHS, PREFILL_MIN_BUCKET
from .decoding import EagerDecoder
from .service import BackendError

__all__ = ["FastDecoder", "available", "cache_slots", "make_decoder", "WEIGHT_MODES", "PREFILL_MIN_BUCKET", "PREFILL_MAX_BUCKET",
           "PREFILL_MAX_GRAPHS"]


def make_decoder(model, engine: str = "auto", weights: str = "same", max_seq_len: Optional[int] = None):
    """The one-row decoder: "fast", "eager", or "auto" (fast on CUDA, eager on CPU). The fast cache holds the
    model's seq_length slots where memory allows (``cache_slots``)."""
    if engine not in ("auto", "fast", "eager"):
        raise ValueError(f"engine must be auto, fast or eager, not {engine!r}")
    on_cuda = model.get_input_embeddings().weight.is_cuda
    if engine == "fast" and not plain_rope(model.config):
        raise BackendError(f"the one-row fast decoder does not implement rope_ratio={model.config.rope_ratio}; use --engine eager (or auto).")
    if engine == "eager" or (engine == "auto" and not (on_cuda and available() and plain_rope(model.config))):
        return EagerDecoder(model)
    return FastDecoder(model, max_seq_len=max_seq_len or cache_slots(model), weights=weights)
