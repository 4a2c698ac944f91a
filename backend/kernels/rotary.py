"""The rotary angle's cosine and sine inside a Triton kernel: one copy of ChatGLM2's rounding rule, used by the
batched decoder's rotary + cache-write kernel and by the QKV GEMVs' rotary epilogues (``rotate_pairs_store``: the
one-row int8/16-bit GEMV's and the 4-bit words kernel's)."""

from __future__ import annotations

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rope_cos_sin(pos, freq, divisor, ROUND: tl.constexpr):
        # cos and sin (float32) of the angle (pos / divisor) * freq for an integer position. ROUND 0: float32
        # throughout (ChatGLM3); 1 (fp16) / 2 (bf16): the position, its quotient, the angle and cos/sin rounded to
        # that dtype, as ChatGLM2's original builds its rotary cache in the model dtype (modeling.rotary_cos_sin)
        if ROUND == 0:
            angle = (pos.to(tl.float32) / divisor) * freq
            c = tl.cos(angle)
            s = tl.sin(angle)
        else:
            half = tl.float16 if ROUND == 1 else tl.bfloat16
            p = pos.to(tl.float32).to(half).to(tl.float32)
            if divisor != 1.0:
                p = (p / divisor).to(half).to(tl.float32)
            angle = (p * freq).to(half).to(tl.float32)
            c = tl.cos(angle).to(half).to(tl.float32)
            s = tl.sin(angle).to(half).to(tl.float32)
        return c, s

    @triton.jit
    def rotate_pairs_store(a, b, row, mask, pos, slot, out_ptr, k_ptr, v_ptr, inv_freq_ptr, divisor, Q_ROWS, KV_ROWS,
                           stride_g, stride_t, HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROUND: tl.constexpr):
        # a QKV linear's epilogue: a, b (float32, as stored: rounded to the output dtype) are rows ``row`` (even) and
        # row + 1; rotary on q and k (interleaved pairs of the first 2 * ROT_PAIRS dims of a head) at position pos,
        # q into out_ptr, k and v into slot ``slot`` (>= 0) of the row's cache (k_ptr, v_ptr: [groups, slots,
        # HEAD_DIM] by stride_g, stride_t); pos < 0 (an idle row) writes no key or value. rope_cache_write's math
        d = row % HEAD_DIM
        i = d // 2
        freq = tl.load(inv_freq_ptr + i, mask=i < ROT_PAIRS, other=0.0)
        c, s = rope_cos_sin(pos, freq, divisor, ROUND)
        rot = (d < 2 * ROT_PAIRS) & (row < Q_ROWS + KV_ROWS)
        a_r = tl.where(rot, a * c - b * s, a)
        b_r = tl.where(rot, b * c + a * s, b)
        is_q = row < Q_ROWS
        tl.store(out_ptr + row, a_r.to(out_ptr.dtype.element_ty), mask=mask & is_q)
        tl.store(out_ptr + row + 1, b_r.to(out_ptr.dtype.element_ty), mask=mask & is_q)
        kv = row - Q_ROWS
        kv_end = tl.where(pos >= 0, KV_ROWS, 0)  # an idle row writes no key or value
        is_k = (kv >= 0) & (kv < kv_end)
        is_v = (kv >= KV_ROWS) & (kv < KV_ROWS + kv_end)
        kv = tl.where(is_v, kv - KV_ROWS, kv)
        kv = tl.where(kv < 0, 0, kv)
        dst = (kv // HEAD_DIM) * stride_g + slot * stride_t + kv % HEAD_DIM
        tl.store(k_ptr + dst, a_r.to(k_ptr.dtype.element_ty), mask=mask & is_k)
        tl.store(k_ptr + dst + 1, b_r.to(k_ptr.dtype.element_ty), mask=mask & is_k)
        tl.store(v_ptr + dst, a_r.to(v_ptr.dtype.element_ty), mask=mask & is_v)
        tl.store(v_ptr + dst + 1, b_r.to(v_ptr.dtype.element_ty), mask=mask & is_v)


def round_mode(angle_dtype) -> int:
    """``rope_cos_sin``'s ROUND for an angle dtype: None (float32) 0, fp16 1, bf16 2."""
    return {torch.float16: 1, torch.bfloat16: 2}.get(angle_dtype, 0)
