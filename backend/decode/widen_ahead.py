"""A long prompt's weights widened ahead, on a stream of their own, while the previous linear's GEMM runs.

From ``int8_linear.WIDEN_MIN_ROWS`` rows a prompt's int8 and 4-bit linears widen their weight to 16 bits for
cuBLAS, then multiply: on one stream the widening (memory-bound: 6.0 of a cold 1600-token prompt's 37 ms of GPU
time on the H100, bench/NOTES.md run 25) and the GEMMs (compute-bound) take turns. Here each weight is widened on
a side stream as soon as the one before the previous is taken, so it overlaps that GEMM, attention or SwiGLU; the
main stream waits on its event only when it needs it. At most ``LOOKAHEAD`` widened weights wait at once (fc1's
is 224 MB in 16 bits), so this runs only where each weight widens in one block (``int8_linear.widen_chunk_bytes``:
a card that gives the process 32 GiB). Each widened tensor is recorded on the main stream, so the allocator
reuses its memory only after the GEMM that read it. ``GLMCHAT_WIDEN_AHEAD=0`` turns it off (A/B).

Why by hand: cuBLAS and torch have no weight-only int8 or NF4 GEMM that widens in its prologue at this speed
(the Triton matmul widening in registers was slower than cuBLAS from 1024 rows, bench/NOTES.md run 9), and torch
overlaps work only across streams the caller makes.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from ..int8_linear import WIDE_CARD_CHUNK_BYTES, WIDEN_MIN_ROWS, widen_chunk_bytes

LOOKAHEAD = 2  # widened weights queued beyond the one in use


def enabled() -> bool:
    return os.environ.get("GLMCHAT_WIDEN_AHEAD", "1") != "0"


_side_streams: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the life of the process: the caching allocator keeps freed blocks per
    stream, so a new stream per prompt would strand each prompt's widened weights in a cache of their own."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(index)
    return _side_streams[index]


class WidenAhead:
    """The widened weights of ``linears`` (BatchLinear, in the order the pass multiplies by them), each made on a
    side stream ``LOOKAHEAD`` linears ahead; ``weight(linear)`` hands one to the main stream."""

    def __init__(self, linears: Sequence, dtype: torch.dtype, device: torch.device):
        self.linears = list(linears)
        self.dtype = dtype
        self.main = torch.cuda.current_stream(device)
        self.side = _side_stream(device)
        self.side.wait_stream(self.main)  # (nothing the side stream reads is written by the pass: the weights)
        self._queued: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._next = 0
        for _ in range(LOOKAHEAD + 1):
            self._queue_next()

    @classmethod
    def for_prompt(cls, linears: Sequence, rows: int, dtype: torch.dtype, device: torch.device) -> Optional["WidenAhead"]:
        """One for a prompt of ``rows`` token rows, or None where the weights are not widened (short prompts,
        16-bit weights), not in one block (a smaller card), or it is switched off, or a graph is being captured."""
        if not enabled() or rows < WIDEN_MIN_ROWS or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return None
        if widen_chunk_bytes(device) < WIDE_CARD_CHUNK_BYTES or not linears:
            return None
        if not all(lin.widens() and lin.widened_bytes(dtype) <= WIDE_CARD_CHUNK_BYTES for lin in linears):
            return None
        return cls(linears, dtype, device)

    def weight(self, linear) -> Optional[Callable[[slice], torch.Tensor]]:
        """``linear``'s widened weight as ``linear_in_blocks`` takes it (a block of rows: here all of them), the
        main stream waiting for its widening; None if it was not queued (the caller widens it itself)."""
        queued = self._queued.pop(id(linear), None)
        if queued is None:
            return None
        widened, done = queued
        self.main.wait_event(done)
        self._queue_next()
        return lambda rows: widened[rows]

    def _queue_next(self) -> None:
        if self._next >= len(self.linears):
            return
        linear = self.linears[self._next]
        self._next += 1
        with torch.cuda.stream(self.side):
            widened = linear.widened_weight(self.dtype)
            done = torch.cuda.Event()
            done.record(self.side)
        widened.record_stream(self.main)  # freed after the main stream's GEMM has read it
        self._queued[id(linear)] = (widened, done)
