"""Weight-only int8 linears for the fast decoder: per-channel quantisation and Triton kernels.

A linear's weight is kept as ``LinearWeights``: the weight [N, K] (int8 with a float32 scale per
output row, or bf16/fp16/fp32 with no scale) and an optional bias. bitsandbytes ``Linear8bitLt``
layers already hold exactly this (``weight.CB`` int8 rows, ``weight.SCB`` absmax per row), so
their storage is shared, never copied or widened to fp16.

Two Triton kernels do the arithmetic on CUDA:
- ``gemv``: one token (M = 1), the decode step. Each program reads a few whole weight rows and
  fuses what sits around the linear in ChatGLM2: the RMSNorm before it (prologue), and after it
  the bias, the residual add, SwiGLU (``silu(a) * b`` of the two halves of ``dense_h_to_4h``) or
  the interleaved rotary embedding with the key/value cache write (``query_key_value``).
  Rows are handled in two sets (a, b): row pairs (2p, 2p+1) for rotary, (p, p + F) for SwiGLU.
- ``matmul``: several rows (M > 1: decode steps of a batch, prompts), int8 weights widened to the
  activation dtype in registers before a tensor-core ``tl.dot``; the row scale is applied to the
  float32 sum, and the epilogue may add the residual or make SwiGLU (one program sums both halves).
From ``WIDEN_MIN_ROWS`` rows up (long prompts, training micro-batches) the matmul is compute-bound and
cuBLAS beats the Triton tiles, so ``widened_linear`` widens the weight a chunk of rows at a time
(``(q * scale)`` in the activation dtype, at most ``widen_chunk_bytes`` alive) for ``F.linear``.
Without CUDA (or Triton) the same functions run as plain torch math.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels import l2_prefetch, packed_products
from .kernels.rotary import round_mode

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the torch fallbacks below are used
    triton = None
    tl = None
    HAVE_TRITON = False


@dataclass
class LinearWeights:
    weight: torch.Tensor  # [N, K]: int8 (with scale) or a float dtype
    scale: Optional[torch.Tensor] = None  # [N] float32: weight row n = weight[n] * scale[n]
    bias: Optional[torch.Tensor] = None  # [N], compute dtype

    @property
    def is_int8(self) -> bool:
        return self.scale is not None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.weight.to(dtype)
        return (self.weight.float() * self.scale[:, None]).to(dtype)


def quantize_per_channel(weight: torch.Tensor, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, as bitsandbytes does: q = round(w * 127 / absmax), scale = absmax / 127.

    Rows are widened to float32 ``chunk`` weights at a time, so quantizing a 6B model's largest weight
    (27392 x 4096) while it loads needs 64 MB of scratch instead of 449."""
    rows_at_once = max(1, chunk // max(1, weight.shape[1]))
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    absmax = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_at_once):
        w = weight[start:start + rows_at_once].float()
        top = w.abs().amax(dim=1).clamp_min(1e-12)
        q[start:start + rows_at_once] = torch.round(w * (127.0 / top)[:, None]).clamp_(-127, 127)
        absmax[start:start + rows_at_once] = top
    return q, absmax / 127.0


def _bnb_kind(module) -> Optional[str]:
    """'int8' / '4bit' for bitsandbytes linears (checked by class name: bnb need not be importable)."""
    names = {cls.__name__ for cls in type(module).__mro__}
    if "Linear8bitLt" in names:
        return "int8"
    if "Linear4bit" in names:
        return "4bit"
    return None


def _float_weight(module) -> torch.Tensor:
    """The module's weight as a float tensor [N, K] (dequantising bitsandbytes layers)."""
    if hasattr(module, "linear_weights"):  # int8_layer.Int8Linear
        return module.linear_weights().dequantize(torch.float32)
    if hasattr(module, "dequantize_weight"):  # int4_release.Int4Linear
        return module.dequantize_weight(torch.float32)
    kind = _bnb_kind(module)
    if kind == "int8":
        cb, scb = _bnb_int8(module)
        return cb.float() * (scb / 127.0)[:, None]
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight


def _bnb_int8(module) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    cb = getattr(w, "CB", None)
    if cb is None:
        cb = w.data
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None)
    if cb.dtype != torch.int8 or scb is None:
        raise ValueError("bitsandbytes Linear8bitLt layer is not quantised yet (move it to the GPU first)")
    return cb, scb.float()


def is_quantized_module(module) -> Optional[str]:
    if hasattr(module, "linear_weights"):  # int8_layer.Int8Linear
        return "int8"
    if hasattr(module, "dequantize_weight"):  # int4_release.Int4Linear (the official int4 release)
        return "4bit"
    return _bnb_kind(module)


def linear_weights(module, mode: str, dtype: torch.dtype) -> LinearWeights:
    """Compact weights of an nn.Linear or bitsandbytes linear.

    ``mode``: "int8" (per-channel int8; bitsandbytes int8 storage is shared as is), or a float
    mode ("bf16"/"fp16"/"fp32") whose weight is shared when it already has that dtype.
    """
    if hasattr(module, "linear_weights") and mode == "int8":  # int8_layer.Int8Linear: already compact
        lw = module.linear_weights()
        return LinearWeights(lw.weight, lw.scale, lw.bias.to(dtype) if lw.bias is not None else None)
    bias = module.bias.detach().to(dtype) if getattr(module, "bias", None) is not None else None
    with torch.no_grad():
        if mode == "int8":
            if _bnb_kind(module) == "int8":
                cb, scb = _bnb_int8(module)
                return LinearWeights(cb, (scb / 127.0).contiguous(), bias)
            q, scale = quantize_per_channel(_float_weight(module).detach())
            return LinearWeights(q, scale, bias)
        wdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mode]
        w = _float_weight(module).detach()
        w = w if w.dtype == wdtype and w.is_contiguous() else w.to(wdtype).contiguous()
        return LinearWeights(w, None, bias)


# ---------------------------------------------------------------------------------------------
# torch math (CPU, and any shape the kernels do not take)


def linear_torch(x: torch.Tensor, lw: LinearWeights) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype. Float weights: exactly ``F.linear`` as nn.Linear does it."""
    if lw.scale is None:
        w = lw.weight if lw.weight.dtype == x.dtype else lw.weight.to(x.dtype)
        return F.linear(x, w, lw.bias)
    y = F.linear(x.float(), lw.weight.float()) * lw.scale  # float32 sum, row scale after it (as the kernels do)
    if lw.bias is not None:
        y = y + lw.bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels

EPI_PLAIN, EPI_SWIGLU, EPI_ROPE = 0, 1, 2

if HAVE_TRITON:
    from .kernels.l2_prefetch import prefetch_bytes
    from .kernels.packed_products import int8_words_sums, widen_int8_f16
    from .kernels.rotary import rope_cos_sin

    @triton.jit
    def int8_as_float(w, CVT: tl.constexpr):
        # int8 weights to float32 for a GEMV's sums. CVT 2, one integer op: bits (w << 15) + 0x3FC00000 are the
        # float 1.5 + w / 256 exactly, so sum w x = 256 (sum f x - 1.5 sum x) (the offset is only ~12x the
        # signal in float32); CVT 1, without the conversion unit: (w + 128) in the low mantissa bits of 2^23;
        # CVT 0: the conversion instruction
        if CVT == 2:
            return ((w.to(tl.int32) << 15) + 0x3FC00000).to(tl.float32, bitcast=True)
        elif CVT == 1:
            return ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return w.to(tl.float32)

    @triton.jit
    def _argmax_key(v, row):
        # int64 keys ordered as (v, -row): float32 bits made monotone as signed int32, then the row
        bits = v.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        return (ordered << 32) | (4294967296 - 1 - row.to(tl.int64))

    @triton.jit
    def _pick_kernel(best_ptr, next_ptr, in_ptr, BAD_TOKEN: tl.constexpr, PDL: tl.constexpr, FEED: tl.constexpr):
        # after the output GEMV with ARGMAX: the next token (BAD_TOKEN if any logit was not finite) into
        # next_ptr; FEED (the one-row decoder): also into in_ptr[0], position and cache slot in_ptr[1:3]
        # advanced; the keys reset
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        key = tl.load(best_ptr)
        row = 4294967296 - 1 - (key - ((key >> 32) << 32))  # the low 32 bits hold 2^32 - 1 - row
        tok = tl.where(tl.load(best_ptr + 1) > 0, BAD_TOKEN, row)
        tl.store(next_ptr, tok)
        if FEED:
            tl.store(in_ptr, tok)
            tl.store(in_ptr + 1, tl.load(in_ptr + 1) + 1)
            tl.store(in_ptr + 2, tl.load(in_ptr + 2) + 1)
        tl.store(best_ptr, -(2**63))
        tl.store(best_ptr + 1, 0)

    @triton.jit
    def _x_tile(x_ptr, norm_ptr, kk, K, BLOCK_P: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        # x[kk] (times norm[kk]) as a [BLOCK_P, BLOCK_K] tile of equal rows (a thread's rows share its loads)
        ptrs = kk[None, :] + tl.zeros([BLOCK_P, 1], dtype=tl.int32)
        if EVEN_K:
            x = tl.load(x_ptr + ptrs).to(tl.float32)
            if NORM:
                x = x * tl.load(norm_ptr + ptrs).to(tl.float32)
        else:
            x = tl.load(x_ptr + ptrs, mask=ptrs < K, other=0.0).to(tl.float32)
            if NORM:
                x = x * tl.load(norm_ptr + ptrs, mask=ptrs < K, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _x_sums(x_ptr, norm_ptr, K, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
        # [BLOCK_K] partial sums of x^2 (for RMSNorm) and of x times the norm weight (CVT 2's offset), as the
        # GEMV loop accumulates them without X_TILE: a pass of its own over x (a few KB, mostly from L1/L2)
        offs_k = tl.arange(0, BLOCK_K)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        xs = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if NORM:
                ss += x * x
                x = x * tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            xs += x
        return ss, xs

    @triton.jit
    def _wide_sums(x_ptr, norm_ptr, w_ptr, row_a, row_b, mask_a, mask_b, K, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr):
        # CVT 3: rows a and b times fp16 x (times the norm weight), int8 read as 64-bit words of 8 weights and
        # multiplied two at a time in fp16 (kernels/packed_products.py); x through pointers of the word tile's
        # shape, so the loop keeps one register layout. EVEN: whole tiles, every row in range
        BLOCK_W: tl.constexpr = BLOCK_K // 8
        KW = K // 8
        wi = tl.max_contiguous(tl.arange(0, BLOCK_W), 1)  # (as quant_words: one layout for words and x)
        words_ptr = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        pairs_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        norm_pairs = norm_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        zero = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.int32)
        ra = row_a.to(tl.int64)[:, None] * KW
        rb = row_b.to(tl.int64)[:, None] * KW
        acc_a = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
        for k0 in range(0, KW, BLOCK_W):
            kw = k0 + wi
            if EVEN:
                wa = tl.load(words_ptr + ra + kw[None, :])
                wb = tl.load(words_ptr + rb + kw[None, :])
                mk = None
            else:
                mk = (kw < KW)[None, :] & (zero == 0)
                wa = tl.load(words_ptr + ra + kw[None, :], mask=mask_a[:, None] & mk, other=0)
                wb = tl.load(words_ptr + rb + kw[None, :], mask=mask_b[:, None] & mk, other=0)
            # rows a and b are the two weight sets of one activation row
            p_a, _, p_b, _ = int8_words_sums(wa, wb, pairs_ptr, norm_pairs, 0, 0, 0, kw, zero, mk, NORM, 1, True)
            acc_a += p_a
            acc_b += p_b
        return tl.sum(acc_a, axis=1) * 128.0, tl.sum(acc_b, axis=1) * 128.0  # int8_dot's sums are 1/128

    @triton.jit
    def _prefetch_weight_rows(w_ptr, pid, N, N_PAIRS, K, ROW_STEP, B_OFF, BLOCK_P: tl.constexpr,
                              ELEM: tl.constexpr):
        # this program's weight rows into L2 (kernels/l2_prefetch.py): 2 * BLOCK_P consecutive rows (plain), or
        # BLOCK_P rows and the BLOCK_P rows B_OFF further (SwiGLU's gate and up halves)
        first = pid.to(tl.int64) * BLOCK_P * ROW_STEP
        end = tl.minimum(first + BLOCK_P * ROW_STEP, tl.minimum(N_PAIRS * ROW_STEP, N))
        row_bytes = K * ELEM
        prefetch_bytes(w_ptr, first * row_bytes, (end - first) * row_bytes, 128)
        if B_OFF > 1:
            prefetch_bytes(w_ptr, (first + B_OFF) * row_bytes, (end - first) * row_bytes, 128)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        k_cache_ptr, v_cache_ptr, pos_ptr, prefix_ptr, inv_freq_ptr, best_ptr,
        N, N_PAIRS, K, ROW_STEP, B_OFF, eps,
        Q_ROWS, KV_ROWS, cache_stride_g, cache_stride_t, pos_divisor,
        HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, ROPE_ROUND: tl.constexpr, SLOT_FROM_PREFIX: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
        W_INT8: tl.constexpr, CVT: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr, EPILOGUE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_P: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr, ROW_SUM: tl.constexpr, ARGMAX: tl.constexpr, X_TILE: tl.constexpr,
        PREFETCH_L2: tl.constexpr,
    ):
        # out rows a = p * ROW_STEP and b = a + B_OFF for the BLOCK_P pairs p of this program
        pid = tl.program_id(0)
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        row_a = p * ROW_STEP
        row_b = row_a + B_OFF
        mask_a = p < N_PAIRS
        mask_b = mask_a & (row_b < N)
        if PDL:  # programmatic dependent launch: the next kernel may start; weights do not depend on the last one
            tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH_L2:  # the program's whole weight slice asked for before waiting on the kernel ahead
            _prefetch_weight_rows(w_ptr, pid, N, N_PAIRS, K, ROW_STEP, B_OFF, BLOCK_P, 1 if W_INT8 else 2)
        if CVT == 3:  # int8 against fp16 x, products two at a time (_wide_sums)
            if PDL:
                tl.extra.cuda.gdc_wait()
            a, b = _wide_sums(x_ptr, norm_ptr, w_ptr, row_a, row_b, mask_a, mask_b, K, BLOCK_P, BLOCK_K, NORM,
                              EVEN_K and EVEN_P)
            if NORM:
                ss, xs = _x_sums(x_ptr, norm_ptr, K, BLOCK_K, NORM)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            wa_ptrs = w_ptr + row_a.to(tl.int64)[:, None] * K + offs_k[None, :]
            wb_ptrs = w_ptr + row_b.to(tl.int64)[:, None] * K + offs_k[None, :]
            if ROW_SUM:  # one float32 per row: registers for more bytes in flight, a reduction per tile
                acc_a = tl.zeros([BLOCK_P], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_P], dtype=tl.float32)
            else:  # a float32 per weight of the tile, summed once at the end
                acc_a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
                acc_b = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
            ss = tl.zeros([BLOCK_K], dtype=tl.float32)
            xs = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of x, for the offset of CVT 2
            if PREFETCH:  # first weight tile before anything that waits on the previous kernel
                wa_n = tl.load(wa_ptrs, mask=mask_a[:, None] & (offs_k < K)[None, :], other=0)
                wb_n = tl.load(wb_ptrs, mask=mask_b[:, None] & (offs_k < K)[None, :], other=0)
            if PDL:
                tl.extra.cuda.gdc_wait()  # x, residual, cache, position: written by earlier kernels
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                if X_TILE:  # x (times the norm weight) through pointers of the weight tile's shape: loaded in the
                    # tile's register layout, where x[None, :] is converted through shared memory (barriers) each tile
                    x = _x_tile(x_ptr, norm_ptr, kk, K, BLOCK_P, NORM, EVEN_K)
                else:
                    if EVEN_K:
                        x = tl.load(x_ptr + kk).to(tl.float32)
                    else:
                        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    if NORM:
                        ss += x * x
                        if EVEN_K:
                            x = x * tl.load(norm_ptr + kk).to(tl.float32)
                        else:
                            x = x * tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                    if W_INT8 and CVT == 2:
                        xs += x
                    x = x[None, :]
                if PREFETCH:  # this tile was loaded one iteration ago; ask for the next one now
                    wa = wa_n
                    wb = wb_n
                    nxt = (kk + BLOCK_K < K)[None, :]
                    wa_n = tl.load(wa_ptrs + k0 + BLOCK_K, mask=mask_a[:, None] & nxt, other=0)
                    wb_n = tl.load(wb_ptrs + k0 + BLOCK_K, mask=mask_b[:, None] & nxt, other=0)
                elif EVEN_K and EVEN_P:
                    wa = tl.load(wa_ptrs + k0)
                    wb = tl.load(wb_ptrs + k0)
                else:
                    mk = (kk < K)[None, :]
                    wa = tl.load(wa_ptrs + k0, mask=mask_a[:, None] & mk, other=0)
                    wb = tl.load(wb_ptrs + k0, mask=mask_b[:, None] & mk, other=0)
                if W_INT8:
                    wa_f = int8_as_float(wa, CVT)
                    wb_f = int8_as_float(wb, CVT)
                else:
                    wa_f = wa.to(tl.float32)
                    wb_f = wb.to(tl.float32)
                if ROW_SUM:
                    acc_a += tl.sum(wa_f * x, axis=1)
                    acc_b += tl.sum(wb_f * x, axis=1)
                else:
                    acc_a += wa_f * x
                    acc_b += wb_f * x
            if X_TILE and (NORM or (W_INT8 and CVT == 2)):  # the sums over x the loop left out, in a pass of their own
                ss, xs = _x_sums(x_ptr, norm_ptr, K, BLOCK_K, NORM)
            if ROW_SUM:
                a = acc_a
                b = acc_b
            else:
                a = tl.sum(acc_a, axis=1)
                b = tl.sum(acc_b, axis=1)
            if W_INT8 and CVT == 2:
                x_sum = 1.5 * tl.sum(xs, axis=0)
                a = (a - x_sum) * 256.0
                b = (b - x_sum) * 256.0
        if NORM:  # RMSNorm is a per-token scalar: applied to the sums, the norm weight went into x
            r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
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
                best = tl.maximum(tl.max(tl.where(mask_a & ok_a, _argmax_key(a_s, row_a), -(2**63)), axis=0),
                                  tl.max(tl.where(mask_b & ok_b, _argmax_key(b_s, row_b), -(2**63)), axis=0))
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
            active = pos >= 0
            slot = tl.maximum(slot, 0)
            d = row_a % HEAD_DIM
            i = d // 2
            freq = tl.load(inv_freq_ptr + i, mask=i < ROT_PAIRS, other=0.0)
            c, s = rope_cos_sin(pos, freq, pos_divisor, ROPE_ROUND)
            rot = (d < 2 * ROT_PAIRS) & (row_a < Q_ROWS + KV_ROWS)
            a_r = tl.where(rot, a * c - b * s, a)
            b_r = tl.where(rot, b * c + a * s, b)
            is_q = row_a < Q_ROWS
            tl.store(out_ptr + row_a, a_r.to(out_ptr.dtype.element_ty), mask=mask_a & is_q)
            tl.store(out_ptr + row_b, b_r.to(out_ptr.dtype.element_ty), mask=mask_a & is_q)
            kv = row_a - Q_ROWS
            kv_end = tl.where(active, KV_ROWS, 0)  # an idle row writes no key or value
            is_k = (kv >= 0) & (kv < kv_end)
            is_v = (kv >= KV_ROWS) & (kv < KV_ROWS + kv_end)
            kv = tl.where(is_v, kv - KV_ROWS, kv)
            kv = tl.where(kv < 0, 0, kv)
            dst = (kv // HEAD_DIM) * cache_stride_g + slot * cache_stride_t + kv % HEAD_DIM
            tl.store(k_cache_ptr + dst, a_r.to(k_cache_ptr.dtype.element_ty), mask=mask_a & is_k)
            tl.store(k_cache_ptr + dst + 1, b_r.to(k_cache_ptr.dtype.element_ty), mask=mask_a & is_k)
            tl.store(v_cache_ptr + dst, a_r.to(v_cache_ptr.dtype.element_ty), mask=mask_a & is_v)
            tl.store(v_cache_ptr + dst + 1, b_r.to(v_cache_ptr.dtype.element_ty), mask=mask_a & is_v)

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
    ):
        # c[M, N] = a[M, K] @ (w[N, K] * scale[N, None]).T (+ bias): scale applied to the float32 sum.
        # SPLIT_K > 1: program (pid, s) sums the s-th K_PART of K into float32 partials c[s, M, N] (stride_cm
        # is N), which _split_sum_kernel adds in order: more programs when few rows leave the SMs idle.
        # RESIDUAL: res[M, N] (it may be c) added after the bias (split: by _split_sum_kernel).
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
        if SPLIT_K > 1:
            part = c_ptr + tl.program_id(1).to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(part, acc, mask=mm[:, None] & mn[None, :])
            return
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


@dataclass(frozen=True)
class GemvConfig:
    block_p: int = 4  # row pairs per program (2 * block_p weight rows)
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 1
    cvt: int = 2  # int8 -> float32: 0 conversion instruction; 1 w + 2^23 trick (4 ops); 2 1.5 + w/256 (1 op);
    # 3 int8 to fp16 two at a time, products two at a time in fp16 (fp16 x: kernels/packed_products.py)
    prefetch: bool = False  # load the next weight tile before using this one (by hand: Triton does not for non-dot loops)
    row_sum: bool = False  # reduce each tile to one float32 per row (fewer registers, bigger tiles)
    x_tile: bool = False  # x loaded in the weight tile's layout (no shared-memory conversion in the loop), its
    # sums for RMSNorm and CVT 2 in a pass of their own


# Measured on an H100 inside the captured step (bench/explore_gemv.py, bench/NOTES.md run 5): a GEMV's time
# alone does not predict its time in the step, where the kernels overlap and the prologues/epilogues do more.
# The defaults: the batched decoder's one-row step runs the same descent on each card at its first warm-up
# (decode/one_row_tuning.py) and keeps that card's winners.
DEFAULT_GEMV = {
    "int8": {
        "qkv": GemvConfig(block_p=4, block_k=1024, row_sum=True),
        "dense": GemvConfig(block_p=2, block_k=1024, cvt=1),
        "fc1": GemvConfig(block_p=4, block_k=2048, row_sum=True),
        "fc2": GemvConfig(block_p=2, block_k=1024, cvt=0, prefetch=True),
        "output": GemvConfig(block_p=8, block_k=1024, row_sum=True),
    },
    "float": {
        "qkv": GemvConfig(block_p=1, block_k=1024),
        "dense": GemvConfig(block_p=2, block_k=1024, row_sum=True),
        "fc1": GemvConfig(block_p=1, block_k=1024),
        "fc2": GemvConfig(block_p=1, block_k=1024, num_warps=8),
        "output": GemvConfig(block_p=8, block_k=1024, row_sum=True),
    },
}


def default_gemv_config(kind: str, int8: bool) -> GemvConfig:
    return DEFAULT_GEMV["int8" if int8 else "float"].get(kind, GemvConfig())


def gemv(
    x: torch.Tensor,
    lw: LinearWeights,
    out: torch.Tensor,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    swiglu: bool = False,
    rope: Optional[dict] = None,
    config: Optional[GemvConfig] = None,
    pdl: bool = False,
    argmax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token through a linear on CUDA: ``out = epilogue(W @ norm(x))``; x [K] contiguous.

    ``norm_weight``: RMSNorm x first (eps). ``residual``: out = residual + W x (may be ``out``).
    ``swiglu``: W has 2F rows, out [F] = silu(W[:F] x) * W[F:] x. ``rope``: dict with q_rows,
    kv_rows, head_dim, inv_freq (float32 [rotary pairs], ``kernels.attention_batch.rotary_inv_freq``),
    k_cache/v_cache ([g, S, d] views) and pos on the device: int64 [pos, slot], or [pos] with ``prefix``
    (int [1], the slot is prefix + pos; pos < 0 writes no key or value); optional divisor (rope_ratio) and
    angle_dtype (fp16/bf16: angles rounded as ChatGLM2's original, ``kernels.rotary``). out receives q
    (rotated), the cache receives k and v at the slot. ``pdl``: launch as a
    programmatic dependent of the previous kernel (Hopper), loading weights before waiting for it.
    ``argmax``: int64 [2] from ``new_argmax_state`` (plain epilogue only): the greedy pick of ``out`` is
    folded into it, for ``pick_token`` to read.
    """
    w = lw.weight
    N, K = w.shape
    cfg = config or GemvConfig()
    if cfg.cvt == 3 and not takes_packed(x, lw, norm_weight):
        cfg = replace(cfg, cvt=2)
    if swiglu:
        n_pairs, row_step, b_off = N // 2, 1, N // 2
    else:
        n_pairs, row_step, b_off = (N + 1) // 2, 2, 1
    epilogue = EPI_SWIGLU if swiglu else (EPI_ROPE if rope is not None else EPI_PLAIN)
    dummy = out
    if argmax is not None and epilogue != EPI_PLAIN:
        raise ValueError("argmax goes with the plain epilogue (the output layer)")
    if rope is not None:
        kc, vc, pos, inv_freq = rope["k_cache"], rope["v_cache"], rope["pos"], rope["inv_freq"]
        prefix = rope.get("prefix")
        rope_args = (rope["q_rows"], rope["kv_rows"], kc.stride(0), kc.stride(1), float(rope.get("divisor", 1.0)))
        head_dim, rot_pairs, rounding = rope["head_dim"], inv_freq.numel(), round_mode(rope.get("angle_dtype"))
    else:
        kc = vc = pos = inv_freq = prefix = dummy
        rope_args = (0, 0, 0, 0, 1.0)
        head_dim, rot_pairs, rounding = 2, 1, 0
    grid = (triton.cdiv(n_pairs, cfg.block_p),)
    _gemv_kernel[grid](
        x, w, lw.scale if lw.is_int8 else dummy, lw.bias if lw.bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, residual if residual is not None else dummy, out,
        kc, vc, pos, prefix if prefix is not None else dummy, inv_freq, argmax if argmax is not None else dummy,
        N, n_pairs, K, row_step, b_off, eps, *rope_args,
        HEAD_DIM=head_dim, ROT_PAIRS=rot_pairs, ROPE_ROUND=rounding, SLOT_FROM_PREFIX=prefix is not None,
        BLOCK_P=cfg.block_p, BLOCK_K=cfg.block_k,
        W_INT8=lw.is_int8, CVT=cfg.cvt, NORM=norm_weight is not None, HAS_BIAS=lw.bias is not None,
        RESIDUAL=residual is not None, EPILOGUE=epilogue,
        EVEN_K=K % cfg.block_k == 0, EVEN_P=n_pairs % cfg.block_p == 0 and (swiglu or N % 2 == 0),
        PREFETCH=cfg.prefetch, PDL=pdl, ROW_SUM=cfg.row_sum, ARGMAX=argmax is not None, X_TILE=cfg.x_tile,
        PREFETCH_L2=l2_prefetch.wanted(x.device), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def takes_packed(x: torch.Tensor, lw: LinearWeights, norm_weight: Optional[torch.Tensor]) -> bool:
    """Whether ``gemv`` can run CVT 3 for these: int8 rows of 8-byte multiples, fp16 x (and norm weight), aligned."""
    w = lw.weight
    return (lw.is_int8 and x.dtype == torch.float16 and w.shape[1] % 8 == 0 and w.data_ptr() % 8 == 0
            and x.data_ptr() % 4 == 0 and (norm_weight is None or (norm_weight.dtype == torch.float16
                                                                   and norm_weight.data_ptr() % 4 == 0)))


def new_argmax_state(device) -> torch.Tensor:
    """The best (value, row) key and the non-finite flag that ``gemv(argmax=...)`` folds into."""
    return torch.tensor([-(2**63), 0], dtype=torch.int64, device=device)


def pick_token(argmax: torch.Tensor, next_token: torch.Tensor, step_in: Optional[torch.Tensor], bad_token: int,
               pdl: bool = False) -> None:
    """After ``gemv(argmax=...)``: next_token = the greedy token (``bad_token`` where a logit was nan or inf, as
    the original's guard does), the state reset; with ``step_in`` (the one-row decoder's [token, position, slot])
    also step_in[0] = that token and step_in[1:3] + 1."""
    _pick_kernel[(1,)](argmax, next_token, step_in if step_in is not None else next_token, BAD_TOKEN=bad_token,
                       PDL=pdl, FEED=step_in is not None, num_warps=1, **({"launch_pdl": True} if pdl else {}))


def matmul(x: torch.Tensor, lw: LinearWeights, config: Optional[tuple] = None, split_k: bool = True,
           swap: Optional[bool] = None, *, residual: Optional[torch.Tensor] = None,
           out: Optional[torch.Tensor] = None, swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (M > 1, CUDA) -> [M, N] in x's dtype through the Triton kernel (int8 or float weights), or
    from ``WIDEN_MIN_ROWS`` int8 rows up through cuBLAS on the widened weight. ``config``: (BLOCK_M, BLOCK_N,
    BLOCK_K, warps, stages, K splits) in place of ``matmul_config``'s (benchmarks); ``split_k`` False: one launch
    (no K splits) where launches cost host time. ``swap``: int8 weights as the tensor cores' first operand
    (``kernels.matmul_swapped`` says why); None: whichever this card ran faster on first use (decode rows).
    ``residual`` [M, N]: added inside the kernel's epilogue (a decode step's add is a launch of its own
    otherwise); ``out`` [M, N] receives the result (it may be the residual, not x). ``swiglu``: W has 2F rows and
    the result is silu(y[:, :F]) * y[:, F:] [M, F], made in the epilogue (each program sums both halves' rows,
    half as many columns of each: the same weight bytes a program as without; no K splits)."""
    M, K = x.shape
    if lw.is_int8 and M >= WIDEN_MIN_ROWS and config is None:
        if not swiglu:
            return widened_linear(x, lw, residual, out)
        from .kernels.decode_kernels import swiglu_rows

        return add_into(swiglu_rows(widened_linear(x, lw)), residual, out)
    if swap is None:
        from .kernels.matmul_swapped import prefers_swapped

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
    # a split's float32 partials [split, M, N] (a few MB at decode rows), summed in order by _split_sum_kernel
    target = out if split == 1 else torch.empty(split, M, N, device=x.device, dtype=torch.float32)
    res = dict(res_ptr=residual if residual is not None else out,
               stride_rm=residual.stride(0) if residual is not None else 0, RESIDUAL=residual is not None)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _matmul_kernel[grid](
        x, lw.weight, scale, bias, target, M, N, K, x.stride(0), out.stride(0),
        W_INT8=lw.is_int8, HAS_BIAS=lw.bias is not None, EVEN_K=K % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split, SWAP_AB=bool(swap), num_warps=warps,
        num_stages=stages, WIDEN=int(lw.is_int8 and x.dtype == torch.float16 and packed_products.tried()),
        F_OFF=N if swiglu else 0, SWIGLU=swiglu,
        **(res if split == 1 else {}),  # (split: the sum adds the residual)
    )
    if split > 1:
        _split_sum_kernel[(M, triton.cdiv(N, 1024))](target, scale, bias, out, M, N, out.stride(0), SPLIT_K=split,
                                                     W_INT8=lw.is_int8, HAS_BIAS=lw.bias is not None, BLOCK_N=1024,
                                                     **res)
    return out


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


# Rows from which an int8 linear widens its weight for cuBLAS: the widening reads 1 byte and writes 2 a weight,
# repaid when the matmul is compute-bound (bench/NOTES.md, run 9); GLMCHAT_WIDEN_MIN_ROWS moves it for benchmarks.
WIDEN_MIN_ROWS = int(os.environ.get("GLMCHAT_WIDEN_MIN_ROWS", "1024"))
WIDEN_CHUNK_BYTES = 64 << 20  # the widened slice alive at once (a small card trains beside it)
# ... and on a card that gives this process 32 GiB or more: fc1 of a 6B layer (224 MB in 16 bits) in one block,
# fc2 in one: half the launches of a long prompt, whose host time the GPU waited for (a cold 1600-token prompt
# left the H100 idle 8 ms of its 45 between launches, bench/NOTES.md run 25)
WIDE_CARD_CHUNK_BYTES = 256 << 20
WIDE_CARD_BYTES = 32 << 30


def widen_chunk_bytes(device: torch.device) -> int:
    """The widened block's size limit on this device: ``WIDE_CARD_CHUNK_BYTES`` where the process may use
    ``WIDE_CARD_BYTES`` of a GPU (its memory fraction counted: a small card's cap on a big one gets the small
    card's blocks), else ``WIDEN_CHUNK_BYTES``."""
    if device.type != "cuda":
        return WIDEN_CHUNK_BYTES
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)
    allowed = torch.cuda.get_device_properties(index).total_memory * fraction
    return WIDE_CARD_CHUNK_BYTES if allowed >= WIDE_CARD_BYTES else WIDEN_CHUNK_BYTES


def _widen_block(total: int, other: int, itemsize: int, device: torch.device) -> int:
    """Rows (or columns) of a widened block: within ``widen_chunk_bytes``, a multiple of 128 unless the whole
    (cuBLAS slows down several times on a block whose size is not a multiple of 8: 2450 rows of fc2 did)."""
    fit = widen_chunk_bytes(device) // max(1, other * itemsize)
    return total if fit >= total else max(128, fit // 128 * 128)


def _widen(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q * scale) in ``dtype``, the product in float32 and rounded once; q [N, K] may be a column slice.
    On CUDA one Triton pass (torch's mixed int8 x float32 multiply ran at ~0.6 TB/s on the H200)."""
    out = torch.empty(q.shape, device=q.device, dtype=dtype)
    if HAVE_TRITON and q.is_cuda:
        N, K = q.shape
        _widen_kernel[(triton.cdiv(N, 32), triton.cdiv(K, 256))](q, scale, out, N, K, q.stride(0), BLOCK_N=32, BLOCK_K=256,
                                                                  num_warps=4)
        return out
    return torch.mul(q, scale[:, None], out=out)


def linear_in_blocks(x: torch.Tensor, n: int, widen: Callable[[slice], torch.Tensor], bias=None,
                     residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias (+ residual) through cuBLAS, W [n, K] given a block of output rows at a time by
    ``widen(rows)`` (at most ``widen_chunk_bytes`` of it alive at once): stored weights, int8 or packed 4-bit,
    read by cuBLAS without a whole widened copy. ``out`` receives the result; where it is the residual itself,
    cuBLAS adds each block's product into it (no add of its own: 56 launches of a long prompt)."""
    rows = _widen_block(n, x.shape[-1], x.element_size(), x.device)
    in_place = residual is not None and out is not None and out.data_ptr() == residual.data_ptr()
    if rows == n and not in_place:
        return add_into(F.linear(x, widen(slice(0, n)), bias), residual, out)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, n)
    for n0 in range(0, n, rows):
        block = slice(n0, n0 + rows)
        _product_into(flat_out[:, block], flat_x, widen(block).t(), None if bias is None else bias[block], in_place)
    if residual is not None and not in_place:
        out += residual
    return out


def add_into(y: torch.Tensor, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y (+ residual), written into ``out`` when one is given (it may be the residual): a product's epilogue
    where no kernel made it."""
    if residual is not None:
        return y + residual if out is None else torch.add(y, residual, out=out)
    return y if out is None else out.copy_(y)


def grad_input_in_blocks(grad_out: torch.Tensor, k: int, widen_cols: Callable[[slice], torch.Tensor]) -> torch.Tensor:
    """dx [..., k] = grad_out [..., N] @ W, W [N, k] given a block of input columns at a time by
    ``widen_cols(cols)`` (a multiple of 128 columns, or all): each column of dx summed whole in one matmul."""
    cols = _widen_block(k, grad_out.shape[-1], grad_out.element_size(), grad_out.device)
    if cols == k:
        return grad_out @ widen_cols(slice(0, k))
    out = torch.empty(*grad_out.shape[:-1], k, device=grad_out.device, dtype=grad_out.dtype)
    flat_grad, flat_out = grad_out.reshape(-1, grad_out.shape[-1]), out.view(-1, k)
    for k0 in range(0, k, cols):
        block = slice(k0, k0 + cols)
        _product_into(flat_out[:, block], flat_grad, widen_cols(block))
    return out


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  accumulate: bool = False) -> None:
    """out = a @ b (+ bias), or out += a @ b (``accumulate``), written by cuBLAS straight into ``out``, a block
    of columns of a wider result (rows strided): assigning a product to the block instead costs a copy of it, 4 of
    a cold 1600-token prompt's 53 ms on the H100 (bench/NOTES.md, run 23). Under autograd (out= records no graph)
    the product is copied in."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        product = a @ b if bias is None else torch.addmm(bias, a, b)
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        torch.addmm(out, a, b, out=out)
        if bias is not None:
            out += bias
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def widened_linear(x: torch.Tensor, lw: LinearWeights, residual: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] @ (q * scale).T + bias (+ residual, into out: ``linear_in_blocks``), the int8 weight widened to
    x's dtype a block of output rows at a time and rounded once, as bitsandbytes' dequantized weight is."""
    return linear_in_blocks(x, lw.weight.shape[0], lambda rows: _widen(lw.weight[rows], lw.scale[rows], x.dtype),
                            lw.bias, residual, out)


def widened_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dx [M, K] = grad_out [M, N] @ (q * scale) through cuBLAS, the weight widened a block of input columns at
    a time."""
    return grad_input_in_blocks(grad_out, weight.shape[1], lambda cols: _widen(weight[:, cols], scale, grad_out.dtype))


def linear(x: torch.Tensor, lw: LinearWeights) -> torch.Tensor:
    """x [..., K] -> [..., N]: int8 weights through the Triton matmul on CUDA, else torch."""
    if lw.is_int8 and HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        shape = x.shape
        return matmul(x.reshape(-1, shape[-1]), lw).view(*shape[:-1], -1)
    return linear_torch(x, lw)
