"""The first launch of a batched decode step: each row's token (fed from the last step's picks on the device, or as
the host sent it) and its embedding.

Why a kernel: a step queued ahead of the host (``BatchFastDecoder._queue_ahead``) used to be fed by three torch
launches between two graph replays (the picks copied into the tokens, a comparison and an add for the positions),
where no launch can overlap its neighbours; the one-row step then began with torch's embedding gather. Here the
gather does the feeding, inside the step's graph: ``flag`` (device, int64) says whether this step follows another
on the device (1, set by the last step's pick) or was sent from the host (0, written with the inputs).
Fed, row r takes ``picks[r]`` as its token and advances its position by one (an idle row stays at -1).
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON
from .gemv_4bit import kernels_run

BLOCK = 1024  # embedding values a program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _feed_embed_kernel(flag_ptr, picks_ptr, tokens_ptr, pos_ptr, emb_ptr, x_ptr, H, stride_e, stride_x,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0)
        part = tl.program_id(1)
        fed = tl.load(flag_ptr) != 0
        token = tl.where(fed, tl.load(picks_ptr + row), tl.load(tokens_ptr + row))
        cols = part * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        values = tl.load(emb_ptr + token.to(tl.int64) * stride_e + cols, mask=mask)
        tl.store(x_ptr + row.to(tl.int64) * stride_x + cols, values, mask=mask)
        if fed & (part == 0):  # one program a row writes its inputs; the others read only the token
            pos = tl.load(pos_ptr + row)
            tl.store(tokens_ptr + row, token)
            tl.store(pos_ptr + row, tl.where(pos >= 0, pos + 1, pos))


def feed_and_embed(flag: torch.Tensor, picks: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                   embedding: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rows [0, B) of the step (B = out.shape[0]): where ``flag`` is set, tokens[:B] = picks[:B] and each running
    row's position + 1; then out = the tokens' embeddings. ``tokens``, ``positions`` and ``picks``: [>= B] int64."""
    rows, hidden = out.shape
    if kernels_run(out) and embedding.stride(1) == 1 and out.stride(1) == 1:
        grid = (rows, triton.cdiv(hidden, BLOCK))
        _feed_embed_kernel[grid](flag, picks, tokens, positions, embedding, out, hidden, embedding.stride(0),
                                 out.stride(0), BLOCK=BLOCK, num_warps=4)
        return out
    fed = flag.reshape(()).bool()  # (no host sync: a graph may capture this)
    tokens[:rows].copy_(torch.where(fed, picks[:rows], tokens[:rows]))
    positions[:rows] += fed & (positions[:rows] >= 0)
    return torch.index_select(embedding, 0, tokens[:rows], out=out)
