"""The one-row GEMVs' epilogue over row pairs (``int8_gemv``'s kernel and ``persistent_gemv``'s): what sits after
the linear in ChatGLM2, fused into the kernel that made its sums."""

from __future__ import annotations

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .greedy_rows import argmax_key
    from .rotary import rotate_pairs_store

    @triton.jit
    def finish_pairs(a, b, r, p, row_a, row_b, mask_a, mask_b, scale_ptr, bias_ptr, res_ptr, out_ptr, k_cache_ptr,
                     v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr, Q_ROWS, KV_ROWS, cache_stride_g,
                     cache_stride_t, pos_divisor, HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr,
                     ROPE_ROUND: tl.constexpr, SLOT_FROM_PREFIX: tl.constexpr, W_INT8: tl.constexpr,
                     NORM: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr,
                     ARGMAX: tl.constexpr):
        # the GEMV's epilogue for row pairs p (rows a and b, their sums a and b): RMSNorm's factor r, the int8
        # scale, the bias, then plain (+ residual, + the greedy pick), SwiGLU, or rotary with the cache write
        if NORM:  # RMSNorm is a per-token scalar (r): applied to the sums, the norm weight went into x
            a = a * r
            b = b * r
        if W_INT8:
            a = a * tl.load(scale_ptr + row_a, mask=mask_a, other=0.0)
            b = b * tl.load(scale_ptr + row_b, mask=mask_b, other=0.0)
        if HAS_BIAS:
            a = a + tl.load(bias_ptr + row_a, mask=mask_a, other=0.0).to(tl.float32)
            b = b + tl.load(bias_ptr + row_b, mask=mask_b, other=0.0).to(tl.float32)
        if EPILOGUE == 0:  # plain: rows a and b, optionally added to a residual (in place is fine)
            if RESIDUAL:
                a = a + tl.load(res_ptr + row_a, mask=mask_a, other=0.0).to(tl.float32)
                b = b + tl.load(res_ptr + row_b, mask=mask_b, other=0.0).to(tl.float32)
            tl.store(out_ptr + row_a, a.to(out_ptr.dtype.element_ty), mask=mask_a)
            tl.store(out_ptr + row_b, b.to(out_ptr.dtype.element_ty), mask=mask_b)
            if ARGMAX:  # greedy pick over all programs: atomic max of (value, -row) keys; any non-finite flagged
                a_s = a.to(out_ptr.dtype.element_ty).to(tl.float32)  # the stored values
                b_s = b.to(out_ptr.dtype.element_ty).to(tl.float32)
                # false for nan and +-inf (not "x - x == 0": the compiler fuses a product's x*y - x*y into
                # an FMA, which leaves the product's rounding error)
                ok_a = tl.abs(a_s) < float("inf")
                ok_b = tl.abs(b_s) < float("inf")
                bad = tl.max(((mask_a & ~ok_a) | (mask_b & ~ok_b)).to(tl.int64), axis=0)
                best = tl.maximum(tl.max(tl.where(mask_a & ok_a, argmax_key(a_s, row_a), -(2**63)), axis=0),
                                  tl.max(tl.where(mask_b & ok_b, argmax_key(b_s, row_b), -(2**63)), axis=0))
                tl.atomic_max(best_ptr, best)
                tl.atomic_max(best_ptr + 1, bad, mask=bad > 0)
        elif EPILOGUE == 1:  # SwiGLU: out[p] = silu(a) * b with b = row p + F
            y = a / (1.0 + tl.exp(-a)) * b
            tl.store(out_ptr + p, y.to(out_ptr.dtype.element_ty), mask=mask_a)
        else:  # rotary on q and k (interleaved pairs of the first 2*ROT_PAIRS dims), then q out, k/v to the cache
            # the sums rounded to the output dtype first, as a rotary kernel after the linear would read them
            a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
            b = b.to(out_ptr.dtype.element_ty).to(tl.float32)
            pos = tl.load(pos_ptr).to(tl.int64)
            if SLOT_FROM_PREFIX:  # the batched decoder's row: its prefix slots, then its tokens
                slot = tl.load(prefix_ptr).to(tl.int64) + pos
            else:  # the one-row decoder keeps the slot beside the position
                slot = tl.load(pos_ptr + 1).to(tl.int64)
            rotate_pairs_store(a, b, row_a, mask_a, pos, tl.maximum(slot, 0), out_ptr, k_cache_ptr, v_cache_ptr,
                               inv_freq_ptr, pos_divisor, Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, HEAD_DIM,
                               ROT_PAIRS, ROPE_ROUND)
