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


if HAVE_TRITON:

    @triton.jit
    def _exponential_rows_kernel(out_ptr, seed_ptr, pos_ptr, V, BLOCK: tl.constexpr, TINY: tl.constexpr):
        # row r of out [R, V]: _exponential_kernel's draws for (seed[r], pos[r])
        r = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(seed_ptr + r) + tl.load(pos_ptr + r) * 1000003
        bits = tl.randint(key, offs)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        tl.store(out_ptr + r.to(tl.int64) * V + offs, tl.maximum(-tl.log(u), TINY), mask=offs < V)


def exponential_noise_rows(out: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """out [R, V] float32 <- row r as ``exponential_noise`` draws it for (seeds[r], positions[r]) (int64 [R])."""
    R, V = out.shape
    if kernels_run(out):
        _exponential_rows_kernel[(triton.cdiv(V, 1024), R)](out, seeds, positions, V, BLOCK=1024, TINY=_TINY)
        return out
    for r in range(R):
        exponential_noise(out[r], seeds[r], positions[r])
    return out


class RowSampling:
    """The settings of the rows ``sample_rows`` draws for, as device tensors (sent in two copies)."""

    def __init__(self, params: list, seeds: list, positions: list, device):
        top_k = [p.top_k if p.top_k and p.top_k > 0 else 0 for p in params]
        top_p = [p.top_p if p.top_p is not None and p.top_p < 1.0 else 1.0 for p in params]
        self.top_k_max = max(top_k)  # 0: no row keeps only its k best
        self.any_top_p = min(top_p) < 1.0
        # 1 - p in double, then float32: the comparison TopPLogitsWarper makes with its Python float (-1: keep all)
        drop_below = [1.0 - p if p < 1.0 else -1.0 for p in top_p]
        floats = torch.tensor([p.temperature for p in params] + drop_below, dtype=torch.float32)
        longs = torch.tensor(top_k + list(seeds) + list(positions), dtype=torch.long)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            floats, longs = floats.pin_memory(), longs.pin_memory()
        self.temperature, self.drop_below = floats.to(device, non_blocking=cuda).split(len(params))
        self.top_k, self.seeds, self.positions = longs.to(device, non_blocking=cuda).split(len(params))


def sample_rows(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """One sampled token per row (int64 [R]) from logits [R, V] float32: each row as ``sample`` draws it with
    ``logits_processors`` of its own settings (the nan/inf guard, temperature, top-k, top-p; no penalty) and its
    own (seed, position) noise, in a few launches for all rows (the host's processors cost ~0.3 ms and a sync a
    row: 20 ms a step at 64 rows). A row's token does not depend on the rows beside it."""
    R, V = logits.shape
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    invalid = torch.zeros_like(logits)
    invalid[:, 5] = 5e4
    scores = torch.where(bad, invalid, logits) / rows.temperature[:, None]  # (x / 1.0 is x: as no warper)
    if rows.top_k_max:  # TopKLogitsWarper: scores below the row's k-th largest go
        top = torch.topk(scores, min(rows.top_k_max, V), dim=-1).values
        kth = top.gather(1, (rows.top_k.clamp(1, V) - 1)[:, None])
        scores = scores.masked_fill((scores < kth) & (rows.top_k[:, None] > 0), float("-inf"))
    if rows.any_top_p:  # TopPLogitsWarper: the least likely tokens summing to at most 1 - p go (rows at p = 1: none)
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= rows.drop_below[:, None]
        drop[:, -1] = False  # min_tokens_to_keep
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    noise = exponential_noise_rows(torch.empty_like(probs), rows.seeds, rows.positions)
    return torch.argmax(probs / noise, dim=-1)
