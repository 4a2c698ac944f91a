"""The fast decoder's own Triton kernels: split attention for one decode step and its combine, and the prompt's
elementwise stages (RMSNorm, rotary + cache write, SwiGLU, with ``rms_norm_rows``/``swiglu_rows`` for the
batched decoder's int8 rows too). The GEMV and matmul they run beside are ``int8_gemv`` and ``int8_matmul``."""

from __future__ import annotations

import torch

from . import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .attention_batch import attend_tile, kv_tile

    @triton.jit
    def _attn_split_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr,
        stride_g, stride_t, sm_scale, HPG, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):
        # one (group, split): its HPG query heads against keys [start, end) of the cache
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        g = tl.program_id(0)
        s = tl.program_id(1)
        length = tl.load(pos_ptr + 1) + 1  # slots 0..slot hold the prefix, past tokens and this one
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_T) * BLOCK_T
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        h = tl.arange(0, HPG_PAD)
        d = tl.arange(0, HEAD_DIM)
        mh = h < HPG
        q = tl.load(q_ptr + (g * HPG + h)[:, None] * HEAD_DIM + d[None, :], mask=mh[:, None], other=0.0)
        m_i = tl.full([HPG_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([HPG_PAD], tl.float32)
        acc = tl.zeros([HPG_PAD, HEAD_DIM], tl.float32)
        base = g.to(tl.int64) * stride_g
        for t0 in range(start, end, BLOCK_T):
            k, v, mt = kv_tile(k_ptr, v_ptr, base, t0, end, stride_t, HEAD_DIM, BLOCK_T)
            m_i, l_i, acc = attend_tile(q, k, v, mt, m_i, l_i, acc, sm_scale, IEEE)
        part = (g * NUM_SPLITS + s) * HPG_PAD + h
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc)

    @triton.jit
    def _attn_combine_kernel(
        o_ptr, m_ptr, l_ptr, out_ptr, HPG, NUM_SPLITS,
        HEAD_DIM: tl.constexpr, HPG_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        head = tl.program_id(0)
        g = head // HPG
        h = head % HPG
        s = tl.arange(0, SPLITS_PAD)
        ms = s < NUM_SPLITS
        d = tl.arange(0, HEAD_DIM)
        part = (g * NUM_SPLITS + s) * HPG_PAD + h
        m = tl.load(m_ptr + part, mask=ms, other=float("-inf"))
        l = tl.load(l_ptr + part, mask=ms, other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
        o = tl.load(o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=ms[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    # -- the prompt on CUDA: the torch math's elementwise stages, one launch each ------------------

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + row * K + offs, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + offs, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, start_arg, past_arg, meta_ptr, S, H, G, stride_g, stride_t,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, LOG2_BASE: tl.constexpr, FROM_DEVICE: tl.constexpr,
    ):
        # token tok, head hd of qkv [S, (H + 2G) * D]: rotary on q and k, q to [H, S, D], k and v to the cache.
        # FROM_DEVICE: start (position of row 0) and past (its cache slot) are meta[0], meta[1] on the device,
        # so that one captured graph serves every start; else the Python ints start_arg, past_arg.
        if FROM_DEVICE:
            start = tl.load(meta_ptr)
            past = tl.load(meta_ptr + 1)
        else:
            start = start_arg
            past = past_arg
        tok = tl.program_id(0)
        hd = tl.program_id(1)
        i = tl.arange(0, HEAD_DIM // 2)
        src = qkv_ptr + (tok.to(tl.int64) * (H + 2 * G) + hd) * HEAD_DIM + 2 * i
        x0 = tl.load(src).to(tl.float32)
        x1 = tl.load(src + 1).to(tl.float32)
        theta = tl.exp2(-(2.0 * i.to(tl.float32) / (2 * ROT_PAIRS)) * LOG2_BASE)
        angle = (start + tok).to(tl.float32) * theta
        c = tl.cos(angle)
        s = tl.sin(angle)
        rot = (i < ROT_PAIRS) & (hd < H + G)
        y0 = tl.where(rot, x0 * c - x1 * s, x0)
        y1 = tl.where(rot, x1 * c + x0 * s, x1)
        if hd < H:
            dst = q_ptr + (hd.to(tl.int64) * S + tok) * HEAD_DIM + 2 * i
        elif hd < H + G:
            dst = k_cache_ptr + (hd - H).to(tl.int64) * stride_g + (past + tok).to(tl.int64) * stride_t + 2 * i
        else:
            dst = v_cache_ptr + (hd - H - G).to(tl.int64) * stride_g + (past + tok).to(tl.int64) * stride_t + 2 * i
        tl.store(dst, y0.to(dst.dtype.element_ty))
        tl.store(dst + 1, y1.to(dst.dtype.element_ty))

    @triton.jit
    def _swiglu_kernel(y_ptr, out_ptr, F_DIM, BLOCK: tl.constexpr):
        # y [S, 2F] -> out [S, F] = silu(y[:, :F]) * y[:, F:]
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F_DIM
        a = tl.load(y_ptr + row * 2 * F_DIM + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(y_ptr + row * 2 * F_DIM + F_DIM + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * F_DIM + offs, (a / (1.0 + tl.exp(-a)) * b).to(out_ptr.dtype.element_ty), mask=m)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [..., K] in one launch: the float32 math of ``modeling.RMSNorm``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    K = x.shape[-1]
    _rmsnorm_kernel[(x.numel() // K,)](x, weight, out, K, eps, BLOCK=triton.next_power_of_2(K), num_warps=8)
    return out


def swiglu_rows(y: torch.Tensor) -> torch.Tensor:
    """silu(y[..., :F]) * y[..., F:] of y [..., 2F] in one launch."""
    y = y.contiguous()
    F_dim = y.shape[-1] // 2
    out = torch.empty(*y.shape[:-1], F_dim, device=y.device, dtype=y.dtype)
    rows = y.numel() // y.shape[-1]
    _swiglu_kernel[(rows, triton.cdiv(F_dim, 1024))](y, out, F_dim, BLOCK=1024, num_warps=4)
    return out
