"""Int8 rows widened to 16 bits for cuBLAS, ``(q * scale)`` rounded once: one Triton pass (torch's mixed int8 x
float32 multiply ran at ~0.6 TB/s on the H200, bench/NOTES.md run 9). ``int8_linear.linear_in_blocks`` calls it
a block of rows at a time, so that a long prompt or a training step never holds a whole widened weight."""

from __future__ import annotations

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _widen_kernel(q_ptr, scale_ptr, out_ptr, N, K, stride_qn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[N, K] (contiguous) = q[N, K] (row stride stride_qn) * scale[N, None], the product in float32
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        q = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_qn + rk[None, :], mask=mask, other=0)
        s = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)
        w = q.to(tl.float32) * s[:, None]
        tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def widen_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q * scale) in ``dtype``, the product in float32 and rounded once; q [N, K] may be a column slice."""
    out = torch.empty(q.shape, device=q.device, dtype=dtype)
    if HAVE_TRITON and q.is_cuda:
        N, K = q.shape
        _widen_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 256))](q, scale, out, N, K, q.stride(0), BLOCK_N=32,
                                                                  BLOCK_K=256, num_warps=4)
        return out
    return torch.mul(q, scale[:, None], out=out)
