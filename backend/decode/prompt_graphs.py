"""One-row prompts of the batched fast decoder as CUDA-graph replays, one graph per (token bucket, key window).

A short prompt is bound by the host: about 30 launches a layer, ~16-20 ms of Python and launch time for 65
tokens on the H200 against ~5 ms of GPU work (bench/NOTES.md runs 10-12). That is a chat's first token, the
first token after an adapter switch, and a server's lone arrival. Replayed from a graph, the prompt costs its
GPU time.

The prompt is padded on the right to a token bucket and reads a key window of a bucketed width; everything that
differs between prompts of one bucket is read from device tensors (``StagedCopy``): the ids, each token's
position (-1 for padding, which writes nothing), prefix length and cache row, the row's first new slot, its last
real token and its cache row. Padding comes after the real tokens, so causally it changes nothing for them, and
the slots past the row's end are masked out of every real query's keys.

A few rows arriving together replay a graph each (``fast_batch.GRAPHED_PROMPT_ROWS``); more rows at once,
prompts over the largest bucket and windows over ``MAX_WINDOW`` run eagerly: long prompts
are bound by the GPU anyway, and the bounds keep the graphs' shared memory pool small on a small card. Graphs
are captured at the decoder's warm-up, or else on a key's first use (the warm-up run before the capture writes
the same keys the replay will).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from .staged_copy import StagedCopy

TOKEN_BUCKETS = (16, 32, 64, 128)
MIN_WINDOW = 256
MAX_WINDOW = 2048  # slots: keys and values spelled out per head at 2048 slots are 17 MB each in the pool
WINDOWS = tuple(MIN_WINDOW << i for i in range((MAX_WINDOW // MIN_WINDOW).bit_length()))  # 256 ... 2048


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def prompt_inputs(rows: list, new: list[list[int]], T: int) -> list[int]:
    """The batched decoder's prompt inputs, flat, for rows' new tokens right-padded to T: the ids [B * T] (padding:
    id 0); each token's position (padding: -1, written nowhere), its row's prefix length and cache row [B * T];
    each row's first new slot [B]; the flat index of each row's last real token [B]; each row's cache row [B]."""
    ids, pos, prefix, cache_rows, first_slot, last = [], [], [], [], [], []
    for b, (row, n) in enumerate(zip(rows, new)):
        ids += n + [0] * (T - len(n))
        pos += list(range(row.cached, row.cached + len(n))) + [-1] * (T - len(n))
        prefix += [row.prefix_len] * T
        cache_rows += [row.slot] * T
        first_slot.append(row.prefix_len + row.cached)
        last.append(b * T + len(n) - 1)
    return ids + pos + prefix + cache_rows + first_slot + last + [row.slot for row in rows]


class PromptGraphs:
    """``math(inputs, batch, tokens, window)`` is the decoder's prompt math (last-token logits [batch, V]) over
    ``inputs`` = ``prompt_inputs``' seven tensors for one row (ids, positions, prefix lengths, cache rows [tokens];
    first new slot, last token, cache row [1]).
    ``capture`` False (no CUDA): the same padded math runs eagerly, so CPU tests check the padding and masks."""

    def __init__(self, math: Callable, device: torch.device, pool, slots: int, capture: bool):
        self._math, self.device, self._pool, self.slots, self.capture = math, device, pool, slots, capture
        self._inputs = StagedCopy(torch.zeros(4 * TOKEN_BUCKETS[-1] + 3, dtype=torch.long), device)
        self._graphs: dict[tuple[int, int], tuple] = {}  # (tokens, window) -> (graph, its logits)
        self.off = False  # a capture failed: every prompt runs eagerly from then on

    def takes(self, rows: list, new: list[list[int]]) -> bool:
        """Whether these rows' prompt runs here: one row, its new tokens and key window within the buckets."""
        return not self.off and len(rows) == 1 and len(new[0]) <= TOKEN_BUCKETS[-1] and self._window(rows[0]) is not None

    def logits(self, row, new: list[int]) -> torch.Tensor:
        """The row's last-token logits [1, V] (a graph's output: read it before the next prompt)."""
        self._stage(row, new)
        return self._run(next(b for b in TOKEN_BUCKETS if b >= len(new)), self._window(row))

    def capture_all(self) -> None:
        """Every (token bucket, key window) graph now, for a decoder's warm-up: otherwise the first prompt that
        reaches a wider window pays the capture in its first token (~40 ms on the H200: bench/NOTES.md, run 13).
        The prompts captured here write keys to cache row 0, which the warm-up leaves unused."""
        if not self.capture:
            return
        scratch = SimpleNamespace(slot=0, prefix_len=0, cached=0)
        for tokens in TOKEN_BUCKETS:
            self._stage(scratch, list(range(tokens)))
            for window in sorted({min(w, self.slots) for w in WINDOWS}):
                if not self.off:
                    self._run(tokens, window)

    def _run(self, tokens: int, window: int) -> torch.Tensor:
        """The staged prompt through the (tokens, window) graph, captured on its first use."""
        run = lambda: self._math(self._views(tokens), 1, tokens, window)  # noqa: E731
        if not self.capture:
            return run()
        key = (tokens, window)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(run)
            except torch.OutOfMemoryError:
                raise  # the decoder fails this prompt with its own sentence
            except Exception as err:  # noqa: BLE001 - a graph we cannot make: the eager path still answers
                warnings.warn(f"one-row prompts run without CUDA graphs from now on: capturing one failed ({err})")
                self.off = True
                return run()
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, run: Callable) -> tuple:
        from ..cuda_streams import warm_and_capture

        return warm_and_capture(run, self.device, self._pool)

    def _window(self, row) -> Optional[int]:
        """Slots the row's queries read: its prefix, earlier tokens and prompt, rounded up to a power of two."""
        width = row.prefix_len + len(row.tokens)
        window = min(max(MIN_WINDOW, _next_pow2(width)), self.slots)
        return window if window <= MAX_WINDOW else None

    def _stage(self, row, new: list[int]) -> None:
        """The row's inputs padded to the largest bucket; a smaller bucket's graph reads the first of each."""
        self._inputs.host.copy_(torch.tensor(prompt_inputs([row], [new], TOKEN_BUCKETS[-1]), dtype=torch.long))
        self._inputs.send()

    def _views(self, tokens: int) -> tuple:
        d, n = self._inputs.device, TOKEN_BUCKETS[-1]
        return (d[:tokens], d[n:n + tokens], d[2 * n:2 * n + tokens], d[3 * n:3 * n + tokens],
                d[4 * n:4 * n + 1], d[4 * n + 1:4 * n + 2], d[4 * n + 2:4 * n + 3])
