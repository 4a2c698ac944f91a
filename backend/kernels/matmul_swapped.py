"""The int8 matmul for decode rows with its operands swapped: ``C.T = W @ X.T``, the weight as the tensor cores'
first operand.

Why: ``int8_linear.matmul`` computes ``X @ W.T``, the widened weight as the second operand. On Hopper, wgmma
reads its second operand only from shared memory, so every int8 tile goes global -> shared -> registers (widened)
-> shared again -> wgmma (PTX of the sm_90 build: 12 shared stores in the loop), and at 5-64 rows the linears ran
at 0.9-1.6 TB/s on the H200 (bench/NOTES.md run 11), a fifth to a third of what the weight bytes allow; at
128-256 rows (evaluation) the same shared-memory round trip sits in a compute-bound loop. wgmma's first operand
may come from registers: with the weight there, it is widened in registers and fed straight in (no shared store
of it), and the activation rows become wgmma's N (16-64: ``m64n16k16`` at 16 rows, no rows computed for nothing
beyond the 16). Machete (vLLM's mixed-input GEMM for Hopper) swaps its operands for the same reason; Triton
emits this form for it (the compile test checks the PTX).

Whether it beats the unswapped kernel on a card is decided there: ``prefers_swapped`` times both on first use per
GPU model, shape and row bucket (``tuning.pick``, cached on disk), so no card is handed a blind default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import tuning
from ..int8_linear import HAVE_TRITON, MATMUL_MID_ROWS, LinearWeights, matmul_config

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ..int8_linear import _split_sum_kernel

    @triton.jit(do_not_specialize=["M"])
    def _matmul_swapped_kernel(
        a_ptr, w_ptr, scale_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_cm,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr = 1,
    ):
        # acc[n, m] = sum_k w[n, k] x[m, k] for BLOCK_N weight rows and BLOCK_M activation rows; c[m, n] =
        # acc[n, m] * scale[n] (+ bias[n]). SPLIT_K > 1: program (pid, s) sums the s-th K part into float32
        # partials [s, M, N], added in order by int8_linear._split_sum_kernel (as the unswapped matmul's)
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_part = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_first = tl.program_id(1) * k_part
        rk = k_first + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
        mm = rm < M
        mn = rn < N
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, tl.minimum(k_part, K - k_first), BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs + k0, mask=mm[:, None], other=0.0)
                w = tl.load(w_ptrs + k0, mask=mn[:, None], other=0)
            else:
                mk = (k0 + rk < K)[None, :]
                a = tl.load(a_ptrs + k0, mask=mm[:, None] & mk, other=0.0)
                w = tl.load(w_ptrs + k0, mask=mn[:, None] & mk, other=0)
            acc = tl.dot(w.to(a.dtype), tl.trans(a), acc)
        if SPLIT_K > 1:
            part = c_ptr + tl.program_id(1).to(tl.int64) * M * N + rm.to(tl.int64)[None, :] * N + rn[:, None]
            tl.store(part, acc, mask=mn[:, None] & mm[None, :])
            return
        acc = acc * tl.load(scale_ptr + rn, mask=mn, other=0.0)[:, None]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + rm.to(tl.int64)[None, :] * stride_cm + rn[:, None]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mn[:, None] & mm[None, :])


def matmul_swapped(x: torch.Tensor, lw: LinearWeights, config: Optional[tuple] = None,
                   split_k: bool = True) -> torch.Tensor:
    """x [M, K] @ (int8 W [N, K] * scale).T (+ bias) -> [M, N] in x's dtype, the weight as the first operand.
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, K splits), else ``matmul_config``'s tiles (BLOCK_M
    then counts activation rows, BLOCK_N weight rows: 64 a warpgroup); ``split_k`` False: one launch."""
    M, K = x.shape
    N = lw.weight.shape[0]
    if not lw.is_int8:
        raise ValueError("the swapped matmul reads int8 weights with their row scale")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages, split = config or matmul_config(M, N, K)
    split = split if split_k else 1
    bias = lw.bias if lw.bias is not None else out
    target = out if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _matmul_swapped_kernel[grid](
        x, lw.weight, lw.scale, bias, target, M, N, K, x.stride(0), out.stride(0),
        HAS_BIAS=lw.bias is not None, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
        num_warps=warps, num_stages=stages,
    )
    if split > 1:
        _split_sum_kernel[(M, triton.cdiv(N, 1024))](target, lw.scale, bias, out, M, N, out.stride(0), SPLIT_K=split,
                                                     W_INT8=True, HAS_BIAS=lw.bias is not None, BLOCK_N=1024)
    return out


@dataclass(frozen=True)
class MatmulForm:
    swapped: bool = False  # the default (first candidate) is the unswapped kernel: what the H200 figures measured


# GLMCHAT_MATMUL_SWAP=0: never the swapped form (the A/B against it in one call)
SWAP_ALLOWED = os.environ.get("GLMCHAT_MATMUL_SWAP", "1") != "0"
_chosen: dict[tuple, bool] = {}  # (N, K, row bucket, dtype, split_k, device) -> swapped: the hot path is one lookup


def prefers_swapped(x: torch.Tensor, lw: LinearWeights, split_k: bool, timer=None) -> bool:
    """Whether this card runs the swapped matmul faster for these rows of this int8 weight: decided on first use
    (outside CUDA-graph capture) by timing both on scratch rows of the row bucket, cached on disk per GPU model.
    Only the Triton tiles' rows (decode steps, evaluation's 128 and 256 rows, short prompts: up to
    MATMUL_MID_ROWS) on CUDA are considered; elsewhere the unswapped kernel runs."""
    M, K = x.shape
    if not (HAVE_TRITON and lw.is_int8 and x.is_cuda and 1 < M <= MATMUL_MID_ROWS) or not SWAP_ALLOWED:
        return False
    N = lw.weight.shape[0]
    bucket = max(16, triton.next_power_of_2(M))
    memo = (N, K, bucket, x.dtype, split_k, x.device)
    if memo in _chosen and timer is None:
        return _chosen[memo]
    key = f"int8_matmul_form|N{N}|K{K}|M{bucket}|{str(x.dtype).split('.')[-1]}|{'split' if split_k else 'one'}"
    from ..int8_linear import matmul

    scratch = torch.randn(bucket, K, device=x.device, generator=torch.Generator(device=x.device).manual_seed(0))
    scratch = scratch.to(x.dtype)

    def run(form: MatmulForm) -> None:
        if form.swapped:
            matmul_swapped(scratch, lw, split_k=split_k)
        else:
            matmul(scratch, lw, split_k=split_k, swap=False)

    form = tuning.pick(key, [MatmulForm(False), MatmulForm(True)], run, x.device, timer=timer)
    if not torch.cuda.is_current_stream_capturing():
        _chosen[memo] = form.swapped
    return form.swapped
