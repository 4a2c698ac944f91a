"""How the fast decoder picks a sampled token: a small CUDA graph per setting after the step (transformers'
warpers and an exponential race with Philox noise keyed by the reply's seed and the position), or on the
host (a mixin of ``FastDecoder``; moved unchanged from backend/fast_decode.py)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import device_sampling
from ..generation import logits_processors
from ..service import SamplingParams


class DeviceSampler:
    """The next token of a sampled reply: a graph per setting after the step, or the host."""

    def _sampler_graph(self, params: SamplingParams):
        """The graph that draws the next token from the step's logits as ``params`` say (captured on first use),
        or None where the step has no graph or the capture fails (the host then samples)."""
        if self._graph is None:
            return None
        key = (params.temperature, params.top_k, params.top_p)
        if key in self._sampler_graphs:
            return self._sampler_graphs[key]
        procs = logits_processors(params)
        noise = self._noise  # outside the graph's pool, alive as long as the graph (a graph holds no tensors)

        def draw():
            token = device_sampling.sample(self._logits.view(1, -1), procs, noise, self._seed, self._in[1:2])[0]
            self._next_token.copy_(token)
            self._in[0].copy_(token)

        try:
            saved = self._in.clone()  # the warm-up draw writes the token
            graph = self._graph_of(draw)
            self._in.copy_(saved)
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: sample on the host instead
            warnings.warn(f"sampling stays on the host: its graph could not be captured ({exc})", stacklevel=2)
            graph = None
        if len(self._sampler_graphs) >= 4:  # a few settings in use at once; drop the oldest
            self._sampler_graphs.pop(next(iter(self._sampler_graphs)))
        self._sampler_graphs[key] = graph
        return graph

    @staticmethod
    def _reply_seed(generator: Optional[torch.Generator]) -> int:
        """The device sampler's seed for one reply: from ``generator`` when given, so a seeded reply repeats."""
        device = generator.device if generator is not None else "cpu"
        return int(torch.randint(0, 2**40, (1,), generator=generator, device=device))

    def _select(self, logits, procs, all_ids, params: SamplingParams, generator) -> int:
        """The next token from logits [1, V] float32, as ``generate_tokens`` picks it."""
        scores = procs(all_ids, logits)
        if params.greedy:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
