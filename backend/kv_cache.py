"""A growable key/value cache for the eager path, with the two methods transformers' caches share.

The model only calls ``update`` and ``get_seq_length``, so transformers' own ``DynamicCache``
(which ``generate()`` makes) works too; ours adds ``crop`` for reusing a conversation's cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self):
        self.keys: list[torch.Tensor] = []  # per layer [b, g, t, d]
        self.values: list[torch.Tensor] = []
        self.prefix_len = 0  # leading slots that hold a P-Tuning prefix, not tokens

    @classmethod
    def with_prefix(cls, prefix_kv) -> "KVCache":
        """A cache whose first slots hold a prefix: 2*layers tensors [b, g, P, d] (key, value per layer)."""
        cache = cls()
        for i in range(0, len(prefix_kv or []), 2):
            cache.update(prefix_kv[i], prefix_kv[i + 1], i // 2)
        cache.prefix_len = prefix_kv[0].shape[2] if prefix_kv else 0
        return cache

    def token_count(self) -> int:
        """Tokens held after the prefix slots."""
        return self.get_seq_length() - self.prefix_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        """Append this step's key/value [b, g, s, d] to layer ``layer_idx``; return the whole [b, g, t, d]."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat((self.keys[layer_idx], key), dim=2)
            self.values[layer_idx] = torch.cat((self.values[layer_idx], value), dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if len(self.keys) > layer_idx else 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` slots of every layer."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]
