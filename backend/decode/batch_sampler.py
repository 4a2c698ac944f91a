"""The batched fast decoder's sampler: every sampled row of a decode step drawn on the device in one small CUDA
graph per batch bucket, replayed after the step's own graph.

Each cache row's settings (temperature, top-k, top-p, noise seed, and whether it samples) live in device
tensors written when a row starts, so a step needs no host work per row and reads nothing back but the tokens.
The draw is ``device_sampling.draw_rows``: each row as the host's processors and an exponential race would
draw it alone. Rows with a repetition penalty need their ids and stay on the host (``device_sampling.on_device``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..device_sampling import draw_rows, row_settings
from ..service import SamplingParams
from .staged_copy import StagedCopy


class BatchSampler:
    def __init__(self, max_batch: int, vocab_size: int, device: torch.device, use_graphs: bool, pool=None):
        self.vocab_size, self.device, self.use_graphs, self._pool = vocab_size, device, use_graphs, pool
        # per cache row: floats (temperature, top-p cut), longs (k-th index, seed, samples here: 1)
        self._floats = StagedCopy(torch.ones(2, max_batch, dtype=torch.float32), device)
        self._longs = StagedCopy(torch.zeros(3, max_batch, dtype=torch.long), device)
        self._dirty = False
        self._graphs: dict = {}
        self._out: dict = {}  # bucket -> the tokens its graph writes

    def set_row(self, slot: int, params: Optional[SamplingParams], seed: int = 0) -> None:
        """Cache row ``slot`` samples with ``params`` (None: it does not sample here) from now on."""
        if params is None:
            if self._longs.host[2, slot]:
                self._longs.host[2, slot] = 0
                self._dirty = True
            return
        floats, longs = row_settings([params], self.vocab_size)
        self._floats.host[:, slot] = torch.tensor(floats)
        self._longs.host[:, slot] = torch.tensor(longs + [seed, 1])
        self._dirty = True

    def upload(self) -> None:
        """Send changed settings to the device, ahead of the next step (before its graph is launched)."""
        if not self._dirty:
            return
        self._floats.send()
        self._longs.send()
        self._dirty = False

    def tokens(self, bucket: int, logits: torch.Tensor, greedy: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows [0, bucket)'s next tokens, written over ``greedy``: drawn for the rows that sample here, ``greedy``
        for the others. ``logits``, ``greedy`` and ``positions``: the step graph's buffers (the same every replay)."""
        if not self.use_graphs:
            return self._math(bucket, logits, greedy, positions)
        graph = self._graphs.get(bucket)
        if graph is None:
            graph = self._capture(bucket, logits, greedy, positions)
        graph.replay()
        return self._out[bucket]

    def draw(self, logits: torch.Tensor, slots: list, positions: list) -> torch.Tensor:
        """Tokens [R] drawn from logits [R, V] (a prompt's last positions ``positions``) with the settings of the
        cache rows ``slots``, outside any graph."""
        self.upload()
        where, pos = torch.tensor([slots, positions], device=self.device)
        f, l = self._floats.device.index_select(1, where), self._longs.device.index_select(1, where)
        return draw_rows(logits.float(), f[0], l[0], f[1], l[1], pos)

    def capture(self, bucket: int, logits: torch.Tensor, greedy: torch.Tensor, positions: torch.Tensor) -> None:
        if self.use_graphs and bucket not in self._graphs:
            self._capture(bucket, logits, greedy, positions)

    def _math(self, bucket, logits, greedy, positions) -> torch.Tensor:
        f, l = self._floats.device[:, :bucket], self._longs.device[:, :bucket]
        drawn = draw_rows(logits.float(), f[0], l[0], f[1], l[1], positions[:bucket].clamp(min=0))
        # into the step's picks: the next step may feed itself from them (kernels.step_feed)
        return greedy.copy_(torch.where(l[2] > 0, drawn, greedy))

    def _capture(self, bucket, logits, greedy, positions):
        from ..cuda_streams import warm_and_capture

        graph, self._out[bucket] = warm_and_capture(lambda: self._math(bucket, logits, greedy, positions), self.device,
                                                    self._pool)
        self._graphs[bucket] = graph
        return graph
