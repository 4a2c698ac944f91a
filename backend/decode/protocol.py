"""The one decoder interface: a batch of rows, each its own prompt, adapter, sampling, seed and stop.

A decoder is stepped by one thread (``backend.decode.batcher.Batcher`` owns it): ``add`` queues a
row, ``step`` prefills the rows added since the last step (each gets its first token) and decodes
one token for every other running row, ``drop`` frees a row at once (cancel). A row that finishes
(a stop token, its ``max_new_tokens``, or the context) is freed by the step that finishes it.
Implementations: ``backend.decode.fast_batch.BatchFastDecoder`` (CUDA and Triton: chat, compare, evaluation,
the server), ``backend.decode.eager.EagerBatchDecoder`` (torch, any device, any batch) and
``backend.decode.fast.SerialFastDecoder`` (the older one-row CUDA decoder, one row at a time: benchmarks'
A/B only, ``engine="serial"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from ..service import SamplingParams

FINISH_STOP = "stop"  # a stop token (eos) was produced; it is the row's last token
FINISH_LENGTH = "length"  # max_new_tokens reached, or the context is full
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class DecodeRequest:
    """One row: ``params.max_new_tokens`` bounds the new tokens; ``adapter`` None is the base model."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    adapter: Optional[str] = None
    seed: Optional[int] = None  # None: drawn from torch's global generator
    stop_token_ids: frozenset = frozenset()


@dataclass(frozen=True)
class RowToken:
    """A new token of row ``row``; ``finish`` is set on the row's last one (the row is freed then)."""

    row: int
    token: int
    finish: Optional[str] = None


class Decoder(Protocol):
    max_batch: int  # rows decoded together at most
    context_length: int  # prefix-free prompt + new tokens one row may hold

    def check(self, request: DecodeRequest) -> None:
        """Raise service.BackendError (one sentence) when ``request`` can never run here."""
        ...

    def fits(self, request: DecodeRequest) -> bool:
        """Whether ``request`` can join the rows running now without running short of memory."""
        ...

    def add(self, row: int, request: DecodeRequest) -> None:
        """Queue a row under the caller's id; it is prefilled by the next ``step``."""
        ...

    def step(self) -> list[RowToken]:
        """One token for every running row (the first for rows just added); finished rows are freed.

        A row whose prefill fails (e.g. out of memory) is dropped and reported through ``failed``."""
        ...

    def failed(self) -> list[tuple[int, Exception]]:
        """Rows dropped by the last ``step`` because their prefill raised, with the error (then cleared)."""
        ...

    def drop(self, row: int) -> None:
        """Free ``row`` now (cancelled); unknown rows are ignored."""
        ...

    @property
    def rows(self) -> int:
        """Rows added and not yet finished or dropped."""
        ...


def next_token(row, logits, device, token: Optional[int] = None) -> RowToken:
    """A decoder row's next token, recorded on the row (``tokens``, ``new``) with its finish reason: ``token``
    when the decoder already picked it (a batched greedy argmax), else drawn from ``logits`` [1, V] through the
    row's processors and generator, as ``generation.generate_tokens`` picks it."""
    if token is None:
        import torch

        params = row.request.params
        penalty = params.repetition_penalty not in (0, 1.0, None)
        ids = torch.tensor([row.tokens], device=device) if penalty else None
        scores = row.procs(ids, logits.float())
        if params.greedy:
            token = int(scores.argmax(-1))
        else:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator))
    row.tokens.append(token)
    row.new += 1
    finish = None
    if token in row.request.stop_token_ids:
        finish = FINISH_STOP
    elif row.new >= row.limit:
        finish = FINISH_LENGTH
    return RowToken(row.id, token, finish)
