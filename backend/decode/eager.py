"""The eager batched decoder: the model's own forward (backend/modeling.py) over a left-padded batch cache.

Each row is prefilled alone (exactly as a single stream would be), then joins the batch: the
batch cache holds, per row, ``[padding..., its prefix's P slots, its tokens]``, left-padded to a
common width, and a 0/1 key mask tells the model which slots are real. So rows with different
adapters and prefix lengths decode together, each at its own rotary positions, and a greedy
row gives the tokens it gives alone. Sampling draws from a torch.Generator per row (seeded from
the request), so a seeded row does not depend on what else is in the batch. A finished row's
cache is kept (a few, newest first) for a later row of the same adapter whose prompt begins
with the same tokens: a chat's next turn feeds only its new tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..generation import logits_processors
from ..kv_cache import KVCache
from ..service import BackendError
from .protocol import DecodeRequest, RowToken, next_token

PrefixOf = Callable[[Optional[str]], Optional[list]]  # adapter name -> prefix KV (split_prefix layout, batch 1) or None


def check_sampling(params) -> None:
    """Settings transformers' warpers refuse, as one sentence before the row starts."""
    try:
        logits_processors(params)
    except ValueError as err:
        raise BackendError(f"bad sampling settings ({err}); use temperature >= 0, 0 < top_p <= 1, top_k >= 0.") from None
    if params.max_new_tokens < 1:
        raise BackendError(f"max_new_tokens is {params.max_new_tokens}; ask for at least 1 new token.")


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Row:
    id: int
    request: DecodeRequest
    prefix_len: int
    limit: int  # new tokens this row may make: max_new_tokens, cut to the context
    tokens: list = field(default_factory=list)  # prompt + new tokens
    new: int = 0
    generator: Optional[torch.Generator] = None
    procs: object = None


@dataclass
class _Finished:
    """A finished row's cache, kept for reuse: ``cached_ids`` are the tokens after the prefix slots."""

    adapter: Optional[str]
    cached_ids: list
    cache: KVCache


class EagerBatchDecoder:
    def __init__(self, model, prefix_of: PrefixOf, max_batch: int = 8, context_length: Optional[int] = None,
                 kv_budget_bytes: Optional[int] = None, keep_finished: int = 4):
        """``kv_budget_bytes``: cache memory the rows may take together (None: unbounded, the CPU default)."""
        self.model = model
        self.prefix_of = prefix_of
        self.max_batch = max_batch
        cfg = model.config
        self.context_length = context_length or cfg.seq_length
        self.device = model.get_input_embeddings().weight.device
        dtype = model.get_input_embeddings().weight.dtype
        self.slot_bytes = cfg.num_layers * 2 * cfg.multi_query_group_num * cfg.kv_channels * dtype.itemsize
        self.kv_budget_bytes = kv_budget_bytes
        self._pending: list[_Row] = []
        self._running: list[_Row] = []  # in batch-cache order
        self._cache: Optional[KVCache] = None  # [B, g, W, d] per layer
        self._mask: Optional[torch.Tensor] = None  # [B, W] 1 = a real slot (prefix or token)
        self._finished: deque[_Finished] = deque(maxlen=keep_finished)
        self._failed: list[tuple[int, Exception]] = []

    # -- admission --------------------------------------------------------------------------

    def check(self, request: DecodeRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise BackendError("the prompt is empty; send some text.")
        if n >= self.context_length:
            raise BackendError(f"the prompt is {n} tokens but the model's context is {self.context_length}; shorten it or start a new conversation.")
        check_sampling(request.params)
        need = self._row_slots(request) * self.slot_bytes
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            raise BackendError(f"this request needs {need / 2**30:.2f} GiB of cache but {self.kv_budget_bytes / 2**30:.2f} GiB is free; ask for fewer new tokens or a shorter prompt.")

    def fits(self, request: DecodeRequest) -> bool:
        if self.rows >= self.max_batch:
            return False
        if self.kv_budget_bytes is None:
            return True
        widths = [self._row_slots(r.request) for r in self._pending + self._running] + [self._row_slots(request)]
        return len(widths) * max(widths) * self.slot_bytes <= self.kv_budget_bytes  # rows are padded to the widest

    def _row_slots(self, request: DecodeRequest) -> int:
        prefix = self.prefix_of(request.adapter)
        P = prefix[0].shape[2] if prefix else 0
        return P + min(len(request.prompt_ids) + request.params.max_new_tokens, self.context_length)

    @property
    def rows(self) -> int:
        return len(self._pending) + len(self._running)

    def add(self, row: int, request: DecodeRequest) -> None:
        self._pending.append(self._new_row(row, request))

    def drop(self, row: int) -> None:
        self._pending = [r for r in self._pending if r.id != row]
        gone = [i for i, r in enumerate(self._running) if r.id == row]
        if gone:
            self._remove(set(gone))

    def failed(self) -> list[tuple[int, Exception]]:
        failed, self._failed = self._failed, []
        return failed

    def _new_row(self, row: int, request: DecodeRequest) -> _Row:
        prefix = self.prefix_of(request.adapter)
        limit = min(request.params.max_new_tokens, self.context_length - len(request.prompt_ids))
        generator = None
        if request.seed is not None and not request.params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        return _Row(row, request, prefix[0].shape[2] if prefix else 0, limit, list(request.prompt_ids),
                    generator=generator, procs=logits_processors(request.params))

    # -- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RowToken]:
        out = self._decode_running() if self._running else []
        pending, self._pending = self._pending, []
        for row in pending:
            try:
                cache, logits = self._prefill(row)
            except torch.OutOfMemoryError:
                self._failed.append((row.id, BackendError("the GPU ran out of memory for this prompt; try again when fewer replies run, or shorten it.")))
                continue
            except Exception as exc:  # noqa: BLE001 - one row's failure must not end the others
                self._failed.append((row.id, exc))
                continue
            token = self._take(row, logits)
            out.append(token)
            if token.finish is None:
                self._join(row, cache)
            else:
                self._keep(row, cache.keys, cache.values, cache.get_seq_length())
        return out

    def _prefill(self, row: _Row):
        """The row alone over its own cache (reused where a finished row began the same way)."""
        ids = row.tokens
        cache, keep = self._reusable(row)
        if cache is None:
            cache, keep = KVCache.with_prefix(self.prefix_of(row.request.adapter)), 0
        feed = torch.tensor([ids[keep:]], device=self.device)
        logits = self.model(feed, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        return cache, logits

    def _reusable(self, row: _Row):
        best, keep = None, 0
        for entry in self._finished:
            if entry.adapter == row.request.adapter:
                n = min(common_prefix_length(entry.cached_ids, row.tokens), len(row.tokens) - 1)  # feed >= 1 token
                if n > keep:
                    best, keep = entry, n
        if best is None:
            return None, 0
        self._finished.remove(best)  # the new row extends it in place
        best.cache.crop(best.cache.prefix_len + keep)
        return best.cache, keep

    def _decode_running(self) -> list[RowToken]:
        rows = self._running
        feed = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # [B, 1]
        positions = torch.tensor([[len(r.tokens) - 1] for r in rows], device=self.device)  # [B, 1], prefix excluded
        mask = torch.cat((self._mask, self._mask.new_ones(len(rows), 1)), dim=1)  # [B, W + 1]
        logits = self.model(feed, attention_mask=mask, position_ids=positions, cache=self._cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()  # [B, V]
        self._mask = mask
        out = [self._take(row, logits[i:i + 1]) for i, row in enumerate(rows)]
        done = {i for i, t in enumerate(out) if t.finish is not None}
        for i in done:
            self._keep_batch_row(i)
        if done:
            self._remove(done)
        return out

    def _take(self, row: _Row, logits: torch.Tensor) -> RowToken:
        return next_token(row, logits, self.device)

    # -- the batch cache --------------------------------------------------------------------

    def _join(self, row: _Row, cache: KVCache) -> None:
        width = cache.get_seq_length()
        row_mask = torch.ones(1, width, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask = KVCache(), row_mask
            self._cache.keys, self._cache.values = list(cache.keys), list(cache.values)
        else:
            W = max(width, self._mask.shape[1])
            self._cache.keys = [torch.cat((_left_pad(b, W), _left_pad(r, W))) for b, r in zip(self._cache.keys, cache.keys)]
            self._cache.values = [torch.cat((_left_pad(b, W), _left_pad(r, W))) for b, r in zip(self._cache.values, cache.values)]
            self._mask = torch.cat((_left_pad(self._mask, W, dim=1), _left_pad(row_mask, W, dim=1)))
        self._running.append(row)

    def _remove(self, indices: set) -> None:
        keep = [i for i in range(len(self._running)) if i not in indices]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())  # leading columns that are padding in every row left
        self._mask = mask[:, start:]
        self._cache.keys = [k.index_select(0, index)[:, :, start:] for k in self._cache.keys]
        self._cache.values = [v.index_select(0, index)[:, :, start:] for v in self._cache.values]

    def _keep_batch_row(self, i: int) -> None:
        """Keep running row i's cache (its real slots are the last ones) for a later turn."""
        width = int(self._mask[i].sum())
        keys = [k[i:i + 1, :, -width:] for k in self._cache.keys]
        values = [v[i:i + 1, :, -width:] for v in self._cache.values]
        self._keep(self._running[i], keys, values, width)

    def _keep(self, row: _Row, keys, values, width: int) -> None:
        if self._finished.maxlen == 0:
            return
        cache = KVCache()
        cache.keys = [k[:, :, :width].clone() for k in keys]
        cache.values = [v[:, :, :width].clone() for v in values]
        cache.prefix_len = row.prefix_len
        # the last token was picked, not fed: the cache holds the tokens before it
        self._finished.appendleft(_Finished(row.request.adapter, row.tokens[: width - row.prefix_len], cache))


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros before its slots along ``dim`` so that it is ``width`` long."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat((t.new_zeros(shape), t), dim=dim)
