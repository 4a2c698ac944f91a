"""The int8 (or 16-bit) matmul for several rows: a batch's decode step, short prompts, ``matmul``.

Int8 weights are widened to the activation dtype in registers before a tensor-core ``tl.dot`` (on fp16 rows by
an exact exponent trick, ``packed_products.widen_int8_f16``); the row scale is applied to the float32 sum, and
the epilogue may add the bias and the residual or make SwiGLU (one program sums both halves). Few rows leave
most SMs idle, so K is split among programs whose float32 partials ``_split_sum_kernel`` adds in order (or, with
``last_sums``, the last program of each output tile, told by a counter). From
``int8_linear.WIDEN_MIN_ROWS`` rows the product is compute-bound and cuBLAS on the widened weight wins:
``int8_linear.linear_rows`` chooses between the two.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from . import packed_products

if TYPE_CHECKING:
    from ..int8_linear import LinearWeights

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from .packed_products import widen_int8_f16

    @triton.jit
    def _weight_tile_dot(a, w, acc, WIDEN: tl.constexpr, SWAP_AB: tl.constexpr):
        # acc + a @ w.T for one K tile of int8 (or 16-bit) weight rows, widened in registers
        if WIDEN == 1:  # int8 to fp16 by the exponent trick (packed_products.widen_int8_asm): exact
            wide = widen_int8_f16(w)
        else:
            wide = w.to(a.dtype)
        if SWAP_AB:
            acc = tl.dot(wide, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(wide), acc)
        return acc

    @triton.jit
    def _up_half(up, scale_ptr, bias_ptr, rn, mn, W_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SWAP_AB: tl.constexpr):
        # SwiGLU's up half [BLOCK_M, BLOCK_N] from its float32 sums (transposed when swapped), scaled, with bias
        if SWAP_AB:
            u = tl.trans(up)
        else:
            u = up
        if W_INT8:
            u = u * tl.load(scale_ptr + rn, mask=mn, other=0.0)[None, :]
        if HAS_BIAS:
            u = u + tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        return u

    @triton.jit(do_not_specialize=["M"])  # a prompt's length: no new compile for each M % 16
    def _matmul_kernel(
        a_ptr, w_ptr, scale_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_cm,
        W_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr = 1, SWAP_AB: tl.constexpr = False, WIDEN: tl.constexpr = 0,
        res_ptr=None, stride_rm=0, RESIDUAL: tl.constexpr = False, F_OFF=0, SWIGLU: tl.constexpr = False,
        part_ptr=None, count_ptr=None, LAST_SUMS: tl.constexpr = False,
    ):
        # c[M, N] = a[M, K] @ (w[N, K] * scale[N, None]).T (+ bias): scale applied to the float32 sum.
        # SPLIT_K > 1: program (pid, s) sums the s-th K_PART of K into float32 partials part[s, M, N], added in
        # order by _split_sum_kernel or (LAST_SUMS) by the tile's last program to finish, told by its counter
        # (count_ptr[pid], zero between launches): more programs when few rows leave the SMs idle.
        # RESIDUAL: res[M, N] (it may be c) added after the bias (split: by whoever adds the partials).
        # SWIGLU (no split): c[M, N] = silu(gate) * up, gate from weight rows n and up from rows F_OFF + n, both
        # summed by the same program (ChatGLM2's dense_h_to_4h without its [M, 2N] output and a launch of its own)
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_part = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_first = tl.program_id(1) * k_part
        rk = k_first + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
        up_ptrs = w_ptr + (rn + F_OFF).to(tl.int64)[:, None] * K + rk[None, :]
        mm = rm < M
        mn = rn < N
        if SWAP_AB:  # acc.T = w @ a.T: the widened weight is the dot's first operand (kernels/matmul_swapped.py)
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = acc  # (SwiGLU's up half)
        for k0 in range(0, tl.minimum(k_part, K - k_first), BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs + k0, mask=mm[:, None], other=0.0)
                w = tl.load(w_ptrs + k0, mask=mn[:, None], other=0)
            else:
                mk = (k0 + rk < K)[None, :]
                a = tl.load(a_ptrs + k0, mask=mm[:, None] & mk, other=0.0)
                w = tl.load(w_ptrs + k0, mask=mn[:, None] & mk, other=0)
            acc = _weight_tile_dot(a, w, acc, WIDEN, SWAP_AB)
            if SWIGLU:
                if EVEN_K:
                    wu = tl.load(up_ptrs + k0, mask=mn[:, None], other=0)
                else:
                    wu = tl.load(up_ptrs + k0, mask=mn[:, None] & (k0 + rk < K)[None, :], other=0)
                up = _weight_tile_dot(a, wu, up, WIDEN, SWAP_AB)
        if SWAP_AB:
            acc = tl.trans(acc)
        mask = mm[:, None] & mn[None, :]
        if SPLIT_K > 1:
            tile = rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(part_ptr + tl.program_id(1).to(tl.int64) * M * N + tile, acc, mask=mask)
            if LAST_SUMS:
                tl.debug_barrier()  # every thread's partials issued before the release below
                arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")
                if arrived == SPLIT_K - 1:  # the tile's last program: the others' partials are visible (acquire)
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    for s in tl.static_range(SPLIT_K):  # in order, as _split_sum_kernel adds them
                        acc += tl.load(part_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                    tl.store(count_ptr + pid, 0)  # ready for the next launch
                    _epilogue(acc, up, scale_ptr, bias_ptr, res_ptr, c_ptr, rm, rn, mm, mn, stride_rm, stride_cm,
                              F_OFF, W_INT8, HAS_BIAS, RESIDUAL, False, SWAP_AB)
        else:
            _epilogue(acc, up, scale_ptr, bias_ptr, res_ptr, c_ptr, rm, rn, mm, mn, stride_rm, stride_cm, F_OFF,
                      W_INT8, HAS_BIAS, RESIDUAL, SWIGLU, SWAP_AB)

    @triton.jit
    def _epilogue(acc, up, scale_ptr, bias_ptr, res_ptr, c_ptr, rm, rn, mm, mn, stride_rm, stride_cm, F_OFF,
                  W_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
                  SWAP_AB: tl.constexpr):
        # the float32 sums [BLOCK_M, BLOCK_N] times the row scale, plus the bias, SwiGLU with the up half's sums, plus
        # the residual, into c
        if W_INT8:
            acc = acc * tl.load(scale_ptr + rn, mask=mn, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * _up_half(up, scale_ptr + F_OFF, bias_ptr + F_OFF, rn, mn, W_INT8,
                                                         HAS_BIAS, SWAP_AB)
        if RESIDUAL:
            res = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=mm[:, None] & mn[None, :],
                          other=0.0)
            acc = acc + res.to(tl.float32)
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _split_sum_kernel(part_ptr, scale_ptr, bias_ptr, c_ptr, M, N, stride_cm, SPLIT_K: tl.constexpr,
                          W_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          res_ptr=None, stride_rm=0, RESIDUAL: tl.constexpr = False):
        # c[m, n] = (sum over s of part[s, m, n], in order) * scale[n] (+ bias[n]) (+ res[m, n]): the split
        # matmul's epilogue
        m = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(part_ptr + (s * M + m) * N + rn, mask=mn, other=0.0)
        if W_INT8:
            acc = acc * tl.load(scale_ptr + rn, mask=mn, other=0.0)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)
        if RESIDUAL:
            acc = acc + tl.load(res_ptr + m * stride_rm + rn, mask=mn, other=0.0).to(tl.float32)
        tl.store(c_ptr + m * stride_cm + rn, acc.to(c_ptr.dtype.element_ty), mask=mn)



def matmul(x: torch.Tensor, lw: LinearWeights, config: Optional[tuple] = None, split_k: bool = True,
           swap: Optional[bool] = None, *, residual: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (M > 1, CUDA) -> [M, N] in x's dtype through the Triton kernel (int8 or float weights; many rows
    are cuBLAS's: ``int8_linear.linear_rows``). ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, K splits) in place of ``matmul_config``'s (benchmarks); ``split_k`` False: one launch
    (no K splits) where launches cost host time. ``swap``: int8 weights as the tensor cores' first operand
    (``kernels.matmul_swapped`` says why); None: whichever this card ran faster on first use (decode rows).
    ``residual`` [M, N]: added inside the kernel's epilogue (a decode step's add is a launch of its own
    otherwise); ``out`` [M, N] receives the result (it may be the residual, not x). ``swiglu``: W has 2F rows and
    the result is silu(y[:, :F]) * y[:, F:] [M, F], made in the epilogue (each program sums both halves' rows,
    half as many columns of each: the same weight bytes a program as without; no K splits)."""
    M, K = x.shape
    if swap is None:
        from .matmul_swapped import prefers_swapped

        # (SwiGLU's halved tiles are too short for a swapped wgmma: unswapped, as every card's decode rows of fc1
        # timed so far)
        swap = config is None and not swiglu and prefers_swapped(x, lw, split_k)
    swap = swap and lw.is_int8
    N = lw.weight.shape[0] // (2 if swiglu else 1)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    elif out.data_ptr() == x.data_ptr():
        raise ValueError("matmul's out must not be its input x: other programs still read the rows it writes")
    bm, bn, bk, warps, stages, split = config or matmul_config(M, lw.weight.shape[0], K)
    split = split if split_k and not swiglu else 1
    if swiglu and config is None and not swap:
        bn = max(16, bn // 2)
    scale = lw.scale if lw.is_int8 else out
    bias = lw.bias if lw.bias is not None else out
    # a split's float32 partials [split, M, N] (a few MB at decode rows), added in order by _split_sum_kernel or by
    # each tile's last program (counters: tile_counters)
    part = out if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    res = dict(res_ptr=residual if residual is not None else out,
               stride_rm=residual.stride(0) if residual is not None else 0, RESIDUAL=residual is not None)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    counters = tile_counters(x.device, grid[0]) if split > 1 else None
    _matmul_kernel[grid](
        x, lw.weight, scale, bias, out, M, N, K, x.stride(0), out.stride(0),
        W_INT8=lw.is_int8, HAS_BIAS=lw.bias is not None, EVEN_K=K % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split, SWAP_AB=bool(swap), num_warps=warps,
        num_stages=stages, WIDEN=int(lw.is_int8 and x.dtype == torch.float16 and packed_products.tried()),
        F_OFF=N if swiglu else 0, SWIGLU=swiglu, part_ptr=part,
        count_ptr=counters if counters is not None else part, LAST_SUMS=counters is not None,
        **(res if split == 1 or counters is not None else {}),  # (else the sum kernel adds the residual)
    )
    if split > 1 and counters is None:
        _split_sum_kernel[(M, triton.cdiv(N, 1024))](part, scale, bias, out, M, N, out.stride(0), SPLIT_K=split,
                                                     W_INT8=lw.is_int8, HAS_BIAS=lw.bias is not None, BLOCK_N=1024,
                                                     **res)
    return out


_counters: dict = {}  # device -> int32 tile counters, zero between launches


def last_sums() -> bool:
    """Whether a split's partials are added by each tile's last program: the default, as it takes compare's 28-56
    split-sum launches a step away (8-bit compare +1.6% on an H100, bench/NOTES.md run 53); bench/ turns it off
    for an A/B with ``GLMCHAT_SPLIT_LAST_SUMS=0`` (not a user setting)."""
    return os.environ.get("GLMCHAT_SPLIT_LAST_SUMS", "1") != "0"


def tile_counters(device: torch.device, tiles: int) -> Optional[torch.Tensor]:
    """Zeroed int32 counters for a split matmul of ``tiles`` output tiles, one set a device for every launch (the
    launches of a stream run one after another, and each tile's last program leaves its counter at zero), so a
    split's partials are added by the tile's last program instead of a launch of their own. None without
    ``last_sums``, or where there are none yet during a CUDA-graph capture (made outside one): the sum kernel."""
    if not last_sums():
        return None
    have = _counters.get(device)
    if have is None or have.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        have = _counters[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return have


MATMUL_SMALL_ROWS = 64  # up to here (decode rows, short prompts), tiles as tall as the rows
MATMUL_MID_ROWS = 256  # up to here (the batched decoder's 128 and 256 rows), tiles for a still bandwidth-bound product


def matmul_config(M: int, N: int, K: int = 4096) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, K splits) for M rows of an N x K weight, from grids timed on the
    H200 at the four layer shapes (bench/bench_linears.py, bench/NOTES.md runs 9 and 11: inside CUDA graphs, four
    splits took qkv at 64 rows from 23.8 to 21.3 us, fc2 from 49.7 to 35.3, and fc2 at 2-8 rows from 27 to 20)."""
    if M <= MATMUL_SMALL_ROWS:  # the weights read once: many narrow programs keep the bandwidth busy
        if N <= 8192:  # qkv, dense, fc2: 64 x 4096 tiles leave most SMs idle; four K splits fill them
            return max(16, triton.next_power_of_2(M)), 64, 128, 4, 4, 4
        return max(16, triton.next_power_of_2(M)), 64, 128, 4, 4, 1
    if M <= MATMUL_MID_ROWS:
        return (64, 128, 128, 8, 3, 1) if N > 8192 else (min(128, triton.next_power_of_2(M)), 64, 128, 8, 3, 1)
    return 128, 128, 64, 8, 4, 1


