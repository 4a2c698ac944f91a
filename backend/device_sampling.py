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

from .kernels import HAVE_TRITON
from .kernels.gemv_4bit import kernels_run
from .service import SamplingParams

if HAVE_TRITON:  # (CPU-only installs: torch draws the noise)
    import triton
    import triton.language as tl

_TINY = 2.0**-30  # the smallest Exp(1) draw kept: p / E stays finite


def on_device(params: SamplingParams) -> bool:
    """Whether ``params`` can be sampled inside the graph (not greedy, no repetition penalty)."""
    return not params.greedy and (not params.repetition_penalty or params.repetition_penalty == 1.0)


if HAVE_TRITON:

    @triton.jit
    def _exponential_kernel(out_ptr, seed_ptr, pos_ptr, V, BLOCK: tl.constexpr, TINY: tl.constexpr):
        # row r of out [R, V]: E ~ Exp(1) for every token, -log(u) with u in (0, 1) from Philox keyed by
        # (seed[r], pos[r]), so a row draws the same wherever it sits in a batch
        r = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(seed_ptr + r) + tl.load(pos_ptr + r) * 1000003
        bits = tl.randint(key, offs)  # uint32
        # 23 bits and a half: u in [2^-24, 1 - 2^-24], exact in float32 (24 bits would round up to 1.0)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        # E > 0 always: E = 0 would make p / E infinite for a kept token and 0 / 0 = nan for a removed one
        tl.store(out_ptr + r.to(tl.int64) * V + offs, tl.maximum(-tl.log(u), TINY), mask=offs < V)


def exponential_noise(out: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """out [V] float32 <- Exp(1) draws keyed by the device scalars ``seed`` and ``pos`` (int64)."""
    exponential_noise_rows(out.view(1, -1), seed.reshape(1), pos.reshape(1))
    return out


def exponential_noise_rows(out: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """out [R, V] float32 <- row r's Exp(1) draws keyed by (seeds[r], positions[r]) (int64 [R] on out's device)."""
    R, V = out.shape
    if kernels_run(out):
        _exponential_kernel[(triton.cdiv(V, 1024), R)](out, seeds, positions, V, BLOCK=1024, TINY=_TINY)
        return out
    for r in range(R):
        g = torch.Generator(device=out.device)
        g.manual_seed(int(seeds[r]) * 1000003 + int(positions[r]))
        out[r].exponential_(generator=g).clamp_(min=_TINY)
    return out


def sample(logits: torch.Tensor, procs: LogitsProcessorList, noise: torch.Tensor, seed: torch.Tensor,
           pos: torch.Tensor) -> torch.Tensor:
    """The sampled token (int64 tensor [1]) from logits [1, V] float32 through ``procs`` (``logits_processors``
    of params that ``on_device`` accepts); every op may be captured in a graph."""
    scores = procs(None, logits)
    probs = torch.softmax(scores, dim=-1)
    exponential_noise(noise, seed, pos)
    return torch.argmax(probs / noise, dim=-1)


def row_settings(params: list, vocab_size: int) -> tuple[list, list]:
    """The per-row numbers ``draw_rows`` reads, as two host lists: floats (each row's temperature, then each
    row's top-p cut 1 - p, -1 for none) and longs (each row's index of its k-th largest score among the ascending
    scores, V - k, 0 for no top-k). 1 - p is taken in double, then float32: the comparison TopPLogitsWarper makes
    with its Python float."""
    temperature = [p.temperature if not p.greedy else 1.0 for p in params]
    drop_below = [1.0 - p.top_p if p.top_p is not None and p.top_p < 1.0 else -1.0 for p in params]
    kth = [max(0, vocab_size - p.top_k) if p.top_k and p.top_k > 0 else 0 for p in params]
    return temperature + drop_below, kth


def draw_rows(logits: torch.Tensor, temperature: torch.Tensor, kth: torch.Tensor, drop_below: torch.Tensor,
              seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each row's token as ``sample`` draws it alone with ``logits_processors`` of its settings (the nan/inf
    guard, temperature, top-k, top-p; no penalty) and its own (seed, position) noise, for all rows at once and
    with no host branch (a CUDA graph replays it): a row's token does not depend on the rows beside it.
    Settings per row [R] as ``row_settings`` makes them. Drawing a row at a time on the host cost ~0.3 ms and a
    sync a row: 20 ms a step at 64 rows."""
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    invalid = torch.zeros_like(logits)
    invalid[:, 5] = 5e4
    scores = torch.where(bad, invalid, logits) / temperature[:, None]  # (x / 1.0 is x: as no warper)
    # one ascending sort serves both warpers: TopKLogitsWarper drops scores below the row's k-th largest; the
    # scores TopPLogitsWarper sorts are these with those dropped, which stay first in this order
    ordered, order = torch.sort(scores, descending=False)
    cut = ordered.gather(1, kth[:, None])  # the k-th largest (the smallest score: nothing dropped)
    ordered = ordered.masked_fill(ordered < cut, float("-inf"))
    drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= drop_below[:, None]  # the least likely summing to <= 1 - p
    drop[:, -1] = False  # min_tokens_to_keep
    scores = scores.masked_fill((scores < cut) | drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    noise = exponential_noise_rows(torch.empty_like(probs), seeds, positions)
    return torch.argmax(probs / noise, dim=-1)
