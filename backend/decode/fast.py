"""The CUDA fast decoder (``backend.fast_decode.FastDecoder``) behind the batched interface, one row at a time.

Its speed path (static cache, the decode step in one CUDA graph, sampling on the device) is used
as it is: the row's tokens come from ``FastDecoder.generate``, stepped one token per ``step``.
``max_batch`` is 1, so concurrent requests queue behind each other in the ``Batcher``. The
decoder keeps the last conversation's cache, so a chat's next turn feeds only its new tokens.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch

from ..service import BackendError
from .eager import check_sampling
from .protocol import FINISH_LENGTH, FINISH_STOP, DecodeRequest, RowToken

_NO_PREFIX_YET = object()


class SerialFastDecoder:
    max_batch = 1

    def __init__(self, fast, prefix_of, context_length: Optional[int] = None):
        self.fast = fast
        self.prefix_of = prefix_of
        self.context_length = min(context_length or fast.max_seq_len, fast.max_seq_len)
        self._adapter = _NO_PREFIX_YET  # whose prefix the cache's first slots hold
        self._pending: deque = deque()
        self._current = None  # (row, request, token iterator, limit, count)
        self._failed: list = []

    def check(self, request: DecodeRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise BackendError("the prompt is empty; send some text.")
        check_sampling(request.params)
        if self._prefix_len(request.adapter) + n >= self.context_length:
            raise BackendError(f"the prompt is {n} tokens but the model's context is {self.context_length}; shorten it or start a new conversation.")

    def fits(self, request: DecodeRequest) -> bool:
        return self.rows == 0

    @property
    def rows(self) -> int:
        return len(self._pending) + (self._current is not None)

    def add(self, row: int, request: DecodeRequest) -> None:
        self._pending.append((row, request))

    def drop(self, row: int) -> None:
        self._pending = deque(p for p in self._pending if p[0] != row)
        if self._current is not None and self._current[0] == row:
            self._current[2].close()
            self._current = None

    def failed(self) -> list:
        failed, self._failed = self._failed, []
        return failed

    def _prefix_len(self, adapter) -> int:
        prefix = self.prefix_of(adapter)
        return prefix[0].shape[2] if prefix else 0

    def _start(self, row: int, request: DecodeRequest) -> None:
        if self._adapter != request.adapter:
            self.fast.set_prefix(self.prefix_of(request.adapter))
            self._adapter = request.adapter
        n = len(request.prompt_ids)
        # FastDecoder.generate stops where its cache is full: one token from the prompt, then one a slot
        limit = min(request.params.max_new_tokens, self.context_length - n,
                    1 + self.fast.max_seq_len - self.fast.prefix_len - n)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.fast.device).manual_seed(request.seed)
        tokens = self.fast.generate(list(request.prompt_ids), request.params, request.stop_token_ids, generator=generator)
        self._current = [row, request, tokens, limit, 0]

    def step(self) -> list[RowToken]:
        if self._current is None:
            if not self._pending:
                return []
            self._start(*self._pending.popleft())
        row, request, tokens, limit, count = self._current
        try:
            token = next(tokens)
        except StopIteration:  # not expected: limit says where generate ends
            self._current = None
            self._failed.append((row, BackendError("the reply ended early: the decoder's cache is full; start a new conversation.")))
            return []
        except Exception as exc:  # noqa: BLE001 - reported on the row's stream
            self._current = None
            self._failed.append((row, exc))
            return []
        self._current[4] = count = count + 1
        finish = FINISH_STOP if token in request.stop_token_ids else FINISH_LENGTH if count >= limit else None
        if finish is not None:
            tokens.close()
            self._current = None
        return [RowToken(row, token, finish)]
