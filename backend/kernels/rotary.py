"""The rotary angle's cosine and sine inside a Triton kernel: one copy of ChatGLM2's rounding rule, used by the
batched decoder's rotary + cache-write kernel and by the one-row GEMV's rotary epilogue."""

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


def round_mode(angle_dtype) -> int:
    """``rope_cos_sin``'s ROUND for an angle dtype: None (float32) 0, fp16 1, bf16 2."""
    return {torch.float16: 1, torch.bfloat16: 2}.get(angle_dtype, 0)
