"""Sampling where the decode step runs, with nothing read on the host: the fast decoder's CUDA graph.

The chat's sampling is the host path's own processors (``logits_processors``: the nan/inf guard,
then transformers' temperature, top-k and top-p warpers), none of which reads anything on the host.
The draw is the exponential race (the token maximising p / E with E ~ Exp(1) is distributed as p:
what ``torch.multinomial`` does for one sample), with E from Philox keyed by a seed and the step's
position held on the device, so a graph replays any number of steps and a seeded reply repeats.
The repetition penalty needs the reply's ids: it stays on the host path.
"""

from __future__ import annotations


import torch
from transformers import LogitsProcessorList

from .kernels.gemv_4bit import kernels_run
from .service import SamplingParams

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: torch draws the noise
    HAVE_TRITON = False

_TINY = 2.0**-30  # the smallest Exp(1) draw kept: p / E stays finite


def on_device(params: SamplingParams) -> bool:
    """Whether ``params`` can be sampled inside the graph (not greedy, no repetition penalty)."""
    return not params.greedy and (not params.repetition_penalty or params.repetition_penalty == 1.0)


if HAVE_TRITON:

    @triton.jit
    def _exponential_kernel(out_ptr, seed_ptr, pos_ptr, V, BLOCK: tl.constexpr, TINY: tl.constexpr):
        # E ~ Exp(1) for every token: -log(u) with u in (0, 1) from Philox keyed by (seed, position)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(seed_ptr) + tl.load(pos_ptr) * 1000003
        bits = tl.randint(key, offs)  # uint32
        # 23 bits and a half: u in [2^-24, 1 - 2^-24], exact in float32 (24 bits would round up to 1.0)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        # E > 0 always: E = 0 would make p / E infinite for a kept token and 0 / 0 = nan for a removed one
        tl.store(out_ptr + offs, tl.maximum(-tl.log(u), TINY), mask=offs < V)


def exponential_noise(out: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """out [V] float32 <- Exp(1) draws keyed by the device scalars ``seed`` and ``pos`` (int64)."""
    if kernels_run(out):
        V = out.numel()
        _exponential_kernel[(triton.cdiv(V, 1024),)](out, seed, pos, V, BLOCK=1024, TINY=_TINY)
        return out
    g = torch.Generator(device=out.device)
    g.manual_seed(int(seed) * 1000003 + int(pos))
    return out.exponential_(generator=g).clamp_(min=_TINY)



def sample(logits: torch.Tensor, procs: LogitsProcessorList, noise: torch.Tensor, seed: torch.Tensor,
           pos: torch.Tensor) -> torch.Tensor:
    """The sampled token (int64 tensor [1]) from logits [1, V] float32 through ``procs`` (``logits_processors``
    of params that ``on_device`` accepts); every op may be captured in a graph."""
    scores = procs(None, logits)
    probs = torch.softmax(scores, dim=-1)
    exponential_noise(noise, seed, pos)
    return torch.argmax(probs / noise, dim=-1)
