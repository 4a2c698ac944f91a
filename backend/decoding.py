"""The eager decoder: one conversation's KV cache, reused across turns, and the active prefix.

The chat engine drives a decoder through three calls (``set_prefix``, ``generate``, ``reset``);
``backend.fast_decode.FastDecoder`` implements the same three with a static cache and CUDA graphs.
"""

from __future__ import annotations

import threading
from typing import Iterable, Iterator, Optional

import torch

from .generation import generate_tokens
from .kv_cache import KVCache
from .service import SamplingParams


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class EagerDecoder:
    def __init__(self, model):
        self.model = model
        self.cache: Optional[KVCache] = None
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds, after the prefix
        self.prefix_kv: Optional[list[torch.Tensor]] = None

    def set_prefix(self, prefix_kv: Optional[list[torch.Tensor]]) -> None:
        """2*layers tensors [1, g, P, d] (key, value per layer), or None for the base model."""
        self.prefix_kv = prefix_kv
        self.reset()

    def reset(self) -> None:
        self.cache = None
        self.cached_ids = []

    def _cache_for(self, input_ids: list[int]) -> KVCache:
        """The cache cropped to the longest run of cached tokens that begins ``input_ids``."""
        keep = min(common_prefix_length(self.cached_ids, input_ids), len(input_ids) - 1)  # feed >= 1 token
        if self.cache is None or keep == 0:
            self.cache = KVCache.with_prefix(self.prefix_kv)
            keep = 0
        else:
            self.cache.crop(self.cache.prefix_len + keep)
        self.cached_ids = input_ids[:keep]
        return self.cache

    def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        cancel: Optional[threading.Event] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[int]:
        """Yield new token ids for the prompt ``input_ids``, reusing the cache where it matches."""
        cache = self._cache_for(input_ids)
        device = self.model.get_input_embeddings().weight.device
        ids = torch.tensor([input_ids], device=device)
        tokens = list(input_ids)
        for token in generate_tokens(self.model, ids, cache, params, eos_token_ids, cancel, generator):
            self.cached_ids = tokens[: cache.token_count()]
            tokens.append(token)
            yield token
