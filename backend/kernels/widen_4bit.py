"""4-bit weights (NF4, the int4 release) widened to 16 bits a block of output rows at a time, for cuBLAS.

Where many rows share a linear (a long prompt, an evaluation's 128-256 rows, and at 16-64 rows where the tuner
finds it faster than ``quant_linear``'s tensor-core tiles, which decode every weight in registers inside the
matmul), the weight is widened into a 16-bit block and multiplied by cuBLAS (``decode.batch_linear`` hands
``widen_rows`` to ``int8_linear.linear_in_blocks``). Blocks of at most ``int8_linear.widen_chunk_bytes`` keep the
transient copy small on a small card, and the same Triton decode as the kernels' (``gemv_4bit._dequant_4bit``:
float32 products rounded once) makes the values exactly ``QuantizedWeight.dequantize``'s. Why not bitsandbytes'
``dequantize_4bit``: it widens a whole weight (224 MB for fc1 in bf16) and reads NF4 only; the int4 release needs
the same for its own layout.
"""

from __future__ import annotations

from typing import Optional

import torch

from .gemv_4bit import HAVE_TRITON, QuantizedWeight, kernels_run

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .gemv_4bit import _dequant_4bit

    @triton.jit
    def _widen_4bit_kernel(
        w_ptr, absmax_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, scale_ptr, out_ptr, row0, n_rows, K,
        FMT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, BLOCKED: tl.constexpr,
        HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # out[r, k] (r < n_rows, the block's rows from weight row row0) = the weight's element (row0 + r, k)
        r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        mask_n = r < n_rows
        rows = tl.where(mask_n, row0 + r, 0).to(tl.int64)
        ev, od = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, code_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n,
                               k0, K, FMT, 1, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_K // 2)
        if HAS_SCALE:  # int4: the row's scale (the nf4 absmax is applied in _dequant_4bit)
            s = tl.load(scale_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            ev = ev * s
            od = od * s
        col = k0 + tl.arange(0, BLOCK_K)  # even and odd columns interleaved back: one contiguous store a row
        w = tl.interleave(ev, od).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * K + col[None, :], w, mask=mask_n[:, None] & (col < K)[None, :])


BLOCK_N, BLOCK_K = 16, 256


def widen_rows(w: QuantizedWeight, rows: slice, dtype: torch.dtype,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``rows`` (a step-1 slice) of the 4-bit weight as [rows, K] in ``dtype``: ``w.dequantize(dtype)[rows]``
    without widening the rest. ``like``: a tensor on the device the kernels run for (default: the weight's)."""
    if w.fmt not in ("nf4", "int4"):
        raise ValueError(f"widen_rows takes 4-bit weights, not {w.fmt}")
    start, stop, _ = rows.indices(w.n)
    if not kernels_run(like if like is not None else w.data):
        return w.dequantize(dtype, slice(start, stop))
    out = torch.empty(stop - start, w.k, device=w.data.device, dtype=dtype)
    nf4 = w.fmt == "nf4"
    dummy = out
    blocked = nf4 and w.k % w.blocksize == 0 and BLOCK_K % w.blocksize == 0
    grid = (triton.cdiv(stop - start, BLOCK_N), triton.cdiv(w.k, BLOCK_K))
    _widen_4bit_kernel[grid](
        w.data, w.absmax if nf4 else dummy, w.code if nf4 else dummy, w.code2 if w.nested else dummy,
        w.absmax2 if w.nested else dummy, w.offset, w.scale if w.scale is not None else dummy, out, start,
        stop - start, w.k, FMT=0 if nf4 else 1, NESTED=w.nested, BS=w.blocksize if nf4 else 2, BS2=w.blocksize2,
        BLOCKED=blocked, HAS_SCALE=w.scale is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out
