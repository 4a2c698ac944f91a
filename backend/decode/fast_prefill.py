"""The fast decoder's prompt, padded to a power-of-two bucket and replayed from a CUDA graph (a mixin of
``FastDecoder``; moved unchanged from backend/fast_decode.py)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..int8_linear import linear
from ..modeling import attention, keys_per_head, rotary_cos_sin

# Prompts padded on the right to a bucket, one CUDA graph per (bucket, key window) (see ``_prefill``).
PREFILL_MIN_BUCKET = 16
PREFILL_MAX_BUCKET = 2048
PREFILL_MAX_GRAPHS = 32  # oldest dropped beyond this (they share one memory pool, so this bounds host-side state)
# masked key windows up to this many bytes of float32 scores (heads x T x KW x 4) take SDPA's math kernel with
# enable_gqa, as _forward_torch does; larger ones repeat the keys per head for memory-efficient attention
PREFILL_MATH_ATTN_BYTES = 64 << 20


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (as triton.next_power_of_2, without needing Triton)."""
    return 1 << max(0, n - 1).bit_length()



class PrefillGraphs:
    """The prompt, padded to a bucket, in a CUDA graph (state set up by ``_init_prefill``)."""

    # -- the prompt, padded to a bucket, in a CUDA graph -----------------------------------------
    #
    # Eager, the prompt is ~11 launches a layer from Python (~11 ms of host time for 64 tokens on an H100,
    # twice its GPU time). Here it is padded on the right to T rows (a power of two) and replayed from a graph.
    # Everything that varies between prompts of one bucket is read from device tensors (ids, start, past,
    # last row), so a graph serves any prompt of its bucket. Right padding is safe: the pad rows come after
    # the real ones, so causally they change nothing; their keys/values land in slots past+s..past+T-1,
    # which the decoder holds empty from then on (cached_ids ends with the prompt): each decode step writes
    # its slot before reading slots < its length, and a later prompt reuses only slots of cached tokens and
    # reads none after its own rows. Keys: a static window [0, KW), KW a power of two >= past + T, with a
    # mask from ``past`` (or plain causal when past = 0, KW = T).

    def _init_prefill(self, enabled: bool) -> None:
        self.prefill_graphs = bool(enabled)
        self.prefill_max_bucket = min(PREFILL_MAX_BUCKET, self.max_seq_len)
        self.prefill_captures = 0
        self._prefill_graph_cache: dict[tuple[int, int, bool], "torch.cuda.CUDAGraph"] = {}
        cuda = self.device.type == "cuda"
        n = 3 + self.prefill_max_bucket  # start, past, last real row, then the ids
        self._pf_in = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._pf_host = torch.zeros(n, dtype=torch.int64, pin_memory=cuda)
        self._pf_copied = torch.cuda.Event() if cuda else None
        self._pf_logits = torch.zeros(1, self.output.weight.shape[0], device=self.device, dtype=torch.float32)

    def _prefill_key(self, s: int, past: int) -> Optional[tuple[int, int, bool]]:
        """(rows T, key window KW, causal) for s new tokens after ``past`` slots, or None: run eagerly."""
        T = max(PREFILL_MIN_BUCKET, _next_pow2(s))
        if T > self.prefill_max_bucket or past + T > self.max_seq_len:
            return None  # the pad rows' cache slots must exist
        if past == 0:
            return T, T, True
        return T, min(_next_pow2(past + T), self.max_seq_len), False

    def _prefill(self, new_ids: list[int], start: int) -> torch.Tensor:
        """Logits [1, V] float32 of the last of ``new_ids`` (positions start..), writing their cache slots."""
        key = self._prefill_key(len(new_ids), self.prefix_len + start) if self.prefill_graphs else None
        if key is None:
            return self._forward_torch(new_ids, start)
        self._set_prefill_input(new_ids, start, key[0])
        if self._graph_pool is None:  # no CUDA graphs: the same padded math, run directly
            return self._forward_padded(*key).clone()
        graph = self._prefill_graph_cache.get(key)
        if graph is None:
            try:
                graph = self._capture_prefill(key)
            except Exception as exc:  # something in the prompt's math that does not capture: stay eager
                warnings.warn(f"prompt graph capture failed, prompts run eagerly: {type(exc).__name__}: {exc}")
                self.prefill_graphs = False
                torch.cuda.synchronize(self.device)
                return self._forward_torch(new_ids, start)
        graph.replay()
        return self._pf_logits.clone()  # the next prompt's replay overwrites the static buffer

    def _set_prefill_input(self, new_ids: list[int], start: int, T: int) -> None:
        """(start, past, last row) and the ids padded with 0 to the bucket of T rows, into _pf_in without a sync."""
        s = len(new_ids)
        if self._pf_copied is not None:
            self._pf_copied.synchronize()  # the previous copy has left the pinned buffer
        host = self._pf_host
        host[0], host[1], host[2] = start, self.prefix_len + start, s - 1
        host[3 : 3 + s] = torch.tensor(new_ids, dtype=torch.int64)
        host[3 + s : 3 + T] = 0  # pad id: any valid row of the embedding
        self._pf_in[: 3 + T].copy_(host[: 3 + T], non_blocking=True)
        if self._pf_copied is not None:
            self._pf_copied.record()

    def _forward_padded(self, T: int, KW: int, causal: bool) -> torch.Tensor:
        """``_forward_torch`` for the prompt in ``_pf_in``, padded to T rows, with nothing read on the host.

        Shapes depend only on (T, KW, causal), so this is what a prompt graph captures; it also runs as is
        (CPU tests). Writes the logits of the last real row to ``_pf_logits`` [1, V] and returns it."""
        meta, ids = self._pf_in[:3], self._pf_in[3 : 3 + T]
        dev = self.device
        x = F.embedding(ids[None], self.embedding)  # [1, T, hidden]
        cos = sin = None
        if not self.fused_prefill:
            cos, sin = rotary_cos_sin((meta[0] + torch.arange(T, device=dev))[None], self.rotary_dim, self.dtype, self.rope)
        mask = None
        if not causal:  # row r (slot past + r) sees slots 0..past+r: the earlier tokens and itself
            rows = meta[1] + torch.arange(T, device=dev)
            mask = (torch.arange(KW, device=dev)[None, :] <= rows[:, None])[None, None]  # [1, 1, T, KW]
        h, d = self.num_heads, self.head_dim
        for i, lw in enumerate(self.layers):
            qkv = linear(self._rms(x, lw.ln1), lw.qkv)  # [1, T, (h + 2g) d]
            q = self._rope_and_cache(qkv, i, cos, sin, None, None, T, meta=meta)  # [1, h, T, d]
            out = self._window_attention(q, i, KW, mask)
            x = x + linear(out.transpose(1, 2).reshape(1, T, h * d), lw.dense)
            x = x + linear(self._swiglu(linear(self._rms(x, lw.ln2), lw.fc1)), lw.fc2)
        x = self._rms(x.index_select(1, meta[2:3]), self.final_ln)  # the last real row
        self._pf_logits.copy_(linear(x, self.output)[:, -1].float())
        return self._pf_logits

    def _window_attention(self, q: torch.Tensor, i: int, KW: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q [1, h, T, d] against layer i's cache slots [0, KW)."""
        keys, values = self.k_cache[i, :, :KW], self.v_cache[i, :, :KW]  # [g, KW, d]
        if mask is None:  # causal from slot 0: as _forward_torch (flash attention on CUDA)
            return attention(q, keys[None], values[None], causal=True, gqa=True)
        h = self.num_heads
        if h * q.shape[2] * KW * 4 <= PREFILL_MATH_ATTN_BYTES:  # as _forward_torch: the math kernel, small scores
            return attention(q, keys[None], values[None], mask, gqa=True)
        # a mask with enable_gqa falls back to the math kernel, whose [h, T, KW] float32 scores would stay
        # reserved in the graph pool; with the groups' keys repeated per head, memory-efficient attention
        # takes the mask
        return attention(q, keys_per_head(keys[None], h), keys_per_head(values[None], h), mask)

    def _capture_prefill(self, key: tuple[int, int, bool]) -> "torch.cuda.CUDAGraph":
        """Capture the padded prompt for ``key``; the input in _pf_in is already set (and the result replayed)."""
        # the warm-up writes the very cache slots (same values) that the replay after the capture writes again
        graph = self._graph_of(lambda: self._forward_padded(*key))
        if len(self._prefill_graph_cache) >= PREFILL_MAX_GRAPHS:
            self._prefill_graph_cache.pop(next(iter(self._prefill_graph_cache)))
        self._prefill_graph_cache[key] = graph
        self.prefill_captures += 1
        return graph
