"""The greedy pick of a batched decode step: each row's argmax over the vocabulary, or a fixed token where the row
holds nan or inf (the original chat's guard), in two launches.

Why its own kernel: torch spends five launches on it (isfinite, all, argmax, a fill and where; ~30 us of the
H100's two-row step of ~3.2 ms, bench/NOTES.md run 27's kernel table), two of them reductions that use a handful
of thread blocks for a few rows. Here every row is cut into tiles, one program a tile (2 x 32 programs for a
compare's two rows of 65,024 logits), each writing its tile's best key and a non-finite flag; a second launch
reduces a row's tiles in one program (8-bit compare on the H100: 1.74-1.76x one reply -> 1.79-1.80x, run 44).
Keys order (value, -index), so ties go to the first index, as torch's argmax.
One row's step folds the same keys into its output GEMV instead (``int8_gemv``'s ARGMAX epilogue).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import HAVE_TRITON

BLOCK = 2048  # logits a program: 32 tiles a row of ChatGLM's 65,024

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def argmax_key(v, index):
        # int64 keys ordered as (v, -index): float32 bits made monotone as signed int32 (-0.0 as 0.0), then the index
        v = tl.where(v == 0.0, 0.0, v)
        bits = v.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        return (ordered << 32) | (4294967296 - 1 - index.to(tl.int64))

    @triton.jit
    def _tile_best_kernel(logits_ptr, key_ptr, bad_ptr, V, stride, TILES, BLOCK: tl.constexpr):
        # one tile of one row: its best finite key and whether it holds a nan or inf
        row = tl.program_id(0)
        tile = tl.program_id(1)
        idx = tile * BLOCK + tl.arange(0, BLOCK)
        mask = idx < V
        v = tl.load(logits_ptr + row.to(tl.int64) * stride + idx, mask=mask, other=0.0).to(tl.float32)
        ok = tl.abs(v) < float("inf")  # false for nan and +-inf
        best = tl.max(tl.where(mask & ok, argmax_key(v, idx), -(2**63)), axis=0)
        bad = tl.max((mask & ~ok).to(tl.int32), axis=0)
        tl.store(key_ptr + row * TILES + tile, best)
        tl.store(bad_ptr + row * TILES + tile, bad)

    @triton.jit
    def _row_pick_kernel(key_ptr, bad_ptr, out_ptr, flag_ptr, TILES, BAD_TOKEN: tl.constexpr, TILES_POW2: tl.constexpr,
                         FLAG: tl.constexpr):
        row = tl.program_id(0)
        t = tl.arange(0, TILES_POW2)
        mask = t < TILES
        key = tl.max(tl.load(key_ptr + row * TILES + t, mask=mask, other=-(2**63)), axis=0)
        bad = tl.max(tl.load(bad_ptr + row * TILES + t, mask=mask, other=0), axis=0)
        index = 4294967296 - 1 - (key - ((key >> 32) << 32))  # the low 32 bits hold 2^32 - 1 - index
        tl.store(out_ptr + row, tl.where(bad > 0, BAD_TOKEN, index))
        if FLAG:  # (every row's program writes the same 1)
            tl.store(flag_ptr, 1)


def greedy_rows(logits: torch.Tensor, bad_token: int, out: Optional[torch.Tensor] = None,
                fed_flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each row's argmax [B] (int64) of ``logits`` [B, V], or ``bad_token`` where the row holds nan or inf; into
    ``out`` if given. ``fed_flag``: set to 1 after (a decode step's: kernels.step_feed)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tiles = triton.cdiv(vocab, BLOCK)
    keys = torch.empty(rows, tiles, dtype=torch.int64, device=logits.device)
    bad = torch.empty(rows, tiles, dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _tile_best_kernel[(rows, tiles)](logits, keys, bad, vocab, logits.stride(0), tiles, BLOCK=BLOCK, num_warps=4)
    _row_pick_kernel[(rows,)](keys, bad, out, fed_flag if fed_flag is not None else out, tiles, BAD_TOKEN=bad_token,
                              TILES_POW2=triton.next_power_of_2(tiles), FLAG=fed_flag is not None, num_warps=1)
    return out


def greedy_rows_torch(logits: torch.Tensor, bad_token: int, out: Optional[torch.Tensor] = None,
                      fed_flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same in torch (the CPU path)."""
    bad = ~torch.isfinite(logits).all(dim=-1)
    picks = torch.where(bad, torch.full_like(bad, bad_token, dtype=torch.long), logits.argmax(-1))
    if fed_flag is not None:
        fed_flag.fill_(1)
    return picks if out is None else out.copy_(picks)
