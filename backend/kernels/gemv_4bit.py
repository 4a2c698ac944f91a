"""Weight-only quantized linears for decode batches of 1..64 rows: NF4, the int4 release, int8.

``quant_linear(x, w)`` computes ``x @ W.T`` for activations x [M, K] (bf16, fp16 or fp32; float32 sums)
straight from the packed weights, never widening W in memory, with what sits around each linear of a
ChatGLM2 layer fused in: the RMSNorm before it (prologue: the norm weight multiplies x, the row's 1/rms the
sums), the bias, SwiGLU (``silu(a) * b`` of the two halves of dense_h_to_4h's rows) and the residual add.
Norm, bias and residual are runtime flags of one compiled kernel (fewer compiles on first use); SwiGLU is a
compile-time variant (two row sets a program). ``decode.batch_linear.quantized_weight(layer)`` takes the
packed form from a loaded layer. Weight formats:

- ``nf4``: bitsandbytes ``Params4bit`` data as stored: uint8, two 4-bit codes a byte over the
  row-major flattened weight [N, K] (element e = n*K + k in byte e // 2, even e in the high nibble),
  value = code[nibble] * absmax[e // blocksize] (blocksize 64 by default) in float32, exactly as
  ``bitsandbytes.functional.dequantize_4bit``. With double quantisation (``compress_statistics``) the
  absmax is itself uint8: absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset, decoded in the
  kernel (1 byte per 64 weights read instead of a widened 4-byte float).
- ``int4``: the official chatglm2-6b-int4 release: ``weight`` int8 [N, K/2], byte j of row n holds
  columns 2j (high nibble) and 2j+1 (low nibble), both signed 4-bit; ``weight_scale`` fp16 [N] per row.
- ``int8``: per-row int8 [N, K] with a float32 scale per row (``int8_linear.LinearWeights``), for
  M = 2..64 (M = 1 has ``int8_gemv.gemv`` with its fused prologues and epilogues).

Why hand-written: at M <= 64 a linear reads its weight once and does almost no arithmetic, so its time
is the bytes read. No library kernel reads bitsandbytes NF4 (or the int4 release) for small M at that
bandwidth: bitsandbytes' own 4-bit inference kernel (``gemv_4bit``) takes a single row, and for more rows
``matmul_4bit`` writes the whole weight out in 16-bit and reads it back for a cuBLAS matmul (about 9x the
bytes of the packed weight); the int4 release ships CUDA kernels compiled for sm_61..sm_89 only.
``int8_matmul.matmul`` has fixed tiles (64 output rows a program): too few programs for a 4608-row weight
at M = 2..64 on a 132-SM card.

Two kernels, the config (tiles, warps, NF4 table form) chosen per GPU model, shape and M bucket by
``tuning.pick`` (tuned on first use, cached on disk):
- ``gemv``: one activation row a program column (grid N-blocks x M); each program reads BLOCK_N whole
  weight rows and reduces every tile to one float32 per row. For M = 1, and small M where rows of the
  same weight block run together and share it through L2.
- ``mm``: a [BLOCK_M, BLOCK_N] tile through the tensor cores; the 4-bit tile is decoded to the
  activation dtype in registers and split into its even and odd columns, so no interleave is needed:
  x_even @ W_even.T + x_odd @ W_odd.T.
NF4 decoding: ``lut=1`` looks up each nibble in the 16-entry table; ``lut=2`` looks up each byte in a
256-entry table of both values (float32 pairs as int64): one L1 gather per byte instead of two. The absmax
of a 64-weight block is loaded once per block and broadcast when K is a multiple of the block size (every
ChatGLM2 linear), else per byte (blocks then straddle rows).
Rounding: the GEMV multiplies float32 weights; the tensor-core tiles round the decoded weight to the
activation dtype (as ``dequantize_4bit`` to bf16 followed by a matmul does). Configs differ per M bucket, so
by default a row's bits depend on the batch size; ``batch_invariant=True`` fixes one config for all M.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from . import packed_products, tuning, weight_prefetch

from . import HAVE_TRITON, untested_persistent_tiles

if HAVE_TRITON:
    import triton
    import triton.language as tl

FORMATS = ("nf4", "int4", "int8")
_FMT_ID = {"nf4": 0, "int4": 1, "int8": 2}
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class QuantizedWeight:
    """A linear's weight [N, K] in its stored quantized form (shared with the loaded model, never copied)."""

    fmt: str  # "nf4" | "int4" | "int8"
    data: torch.Tensor  # nf4: uint8, N*K/2 bytes (bnb's [N*K/2, 1]); int4: int8 [N, K/2]; int8: int8 [N, K]
    n: int
    k: int
    scale: Optional[torch.Tensor] = None  # int4: fp16 [N]; int8: float32 [N]
    absmax: Optional[torch.Tensor] = None  # nf4: float32 [blocks], or uint8 [blocks] when nested
    code: Optional[torch.Tensor] = None  # nf4: float32 [16], the NF4 values
    blocksize: int = 64
    code2: Optional[torch.Tensor] = None  # nested nf4: float32 [256], the absmax code
    absmax2: Optional[torch.Tensor] = None  # nested nf4: float32 [blocks / blocksize2]
    blocksize2: int = 256
    offset: float = 0.0  # nested nf4: added to the decoded absmax
    _pair_table: Optional[torch.Tensor] = field(default=None, repr=False)
    # 4-bit: the code as packed_products's 8 table registers, per 16-bit activation dtype (built with the weight,
    # on the host: never inside a CUDA graph capture)
    table_registers: dict = field(default_factory=dict, repr=False)
    _shared_pairs: dict = field(default_factory=dict, repr=False)  # dtype -> ``shared_pairs``

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    def pair_table(self) -> torch.Tensor:
        """int64 [256]: byte b -> (code[b >> 4], code[b & 15]) as two float32s (low word = the even column)."""
        if self._pair_table is None:
            b = torch.arange(256, device=self.code.device)
            pairs = torch.stack((self.code.float()[b >> 4], self.code.float()[b & 15]), dim=1).contiguous()
            self._pair_table = pairs.view(torch.int64).view(256)
        return self._pair_table

    def shared_pairs(self, dtype: torch.dtype) -> torch.Tensor:
        """int32 [256] on the weight's device: the shared byte-pair table's entries for ``dtype`` activations
        (``packed_products.pair_words``; made with the weight by ``nf4_weight`` and ``int4_release_weight``)."""
        if dtype not in self._shared_pairs:
            raise ValueError(f"a {self.fmt} weight has no shared byte-pair table for {dtype} activations")
        return self._shared_pairs[dtype]

    def absmax_float(self) -> torch.Tensor:
        """nf4: the float32 absmax per block (nested ones decoded as bitsandbytes does)."""
        if not self.nested:
            return self.absmax.float()
        blocks = torch.arange(self.absmax.numel(), device=self.absmax.device)
        return self.code2[self.absmax.long()] * self.absmax2[blocks // self.blocksize2] + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """[N, K] (or the step-1 slice ``rows`` of it) in ``dtype``: the reference the kernels are checked against
        (and the torch fallback)."""
        start, stop, _ = rows.indices(self.n)
        if self.fmt == "int8":
            return (self.data[start:stop].float() * self.scale[start:stop].float()[:, None]).to(dtype)
        if self.fmt == "int4":
            b = self.data[start:stop].to(torch.int32)
            q = torch.stack((b >> 4, (b << 28) >> 28), dim=-1).reshape(stop - start, self.k)
            return (q.float() * self.scale[start:stop].float()[:, None]).to(dtype)
        e = torch.arange(start * self.k, stop * self.k, device=self.data.device)  # elements, row-major
        b = self.data.reshape(-1)[e // 2].to(torch.int64)
        codes = torch.where(e % 2 == 0, b >> 4, b & 15)
        w = self.code.float()[codes] * self.absmax_float()[e // self.blocksize]
        return w.reshape(stop - start, self.k).to(dtype)


def nf4_weight(data: torch.Tensor, quant_state) -> QuantizedWeight:
    """A bitsandbytes NF4 weight: ``Params4bit`` data (uint8) and its ``QuantState`` (nested or not)."""
    qs = quant_state
    if qs.quant_type != "nf4":
        raise ValueError(f"only NF4 4-bit weights are supported, this one is {qs.quant_type!r}")
    if len(qs.shape) != 2 or qs.shape[1] % 2:
        raise ValueError(f"4-bit weight of shape {tuple(qs.shape)}: need [N, K] with K even")
    n, k = int(qs.shape[0]), int(qs.shape[1])
    if data.dtype != torch.uint8 or data.numel() * 2 != n * k or not data.is_contiguous():
        raise ValueError("4-bit weight data must be contiguous uint8 holding two codes a byte")
    w = QuantizedWeight("nf4", data, n, k, absmax=qs.absmax, code=qs.code.float(), blocksize=int(qs.blocksize))
    w.table_registers = _table_registers(w.code)
    w._shared_pairs = _shared_pairs(w.code, data.device)
    if qs.nested:
        s2 = qs.state2
        w.code2, w.absmax2 = s2.code.float(), s2.absmax.float()
        w.blocksize2, w.offset = int(s2.blocksize), float(qs.offset)
    elif qs.absmax.dtype != torch.float32:
        w.absmax = qs.absmax.float()
    return w


def params4bit_weight(param) -> QuantizedWeight:
    """From a bitsandbytes ``Params4bit`` (a ``Linear4bit``'s ``.weight``) after quantisation."""
    if getattr(param, "quant_state", None) is None:
        raise ValueError("bitsandbytes 4-bit weight is not quantised yet (move the layer to the GPU first)")
    return nf4_weight(param.data, param.quant_state)


def int4_release_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> QuantizedWeight:
    """The chatglm2-6b-int4 release's ``weight`` int8 [N, K/2] and ``weight_scale`` fp16 [N]."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight_scale.shape != (weight.shape[0],):
        raise ValueError(
            f"int4 weight must be int8 [out, in/2] with a scale per row; got {weight.dtype} "
            f"{tuple(weight.shape)} and scale {tuple(weight_scale.shape)}"
        )
    n, half = weight.shape
    w = QuantizedWeight("int4", weight.contiguous(), int(n), int(half) * 2, scale=weight_scale)
    w.table_registers = _table_registers(packed_products.INT4_CODE)
    w._shared_pairs = _shared_pairs(packed_products.INT4_CODE, weight.device)
    return w


def _table_registers(code) -> dict:
    """packed_products's registers for a 16-value code, for bf16 and fp16 activations."""
    return {dtype: packed_products.byte_planes(code, dtype) for dtype in (torch.bfloat16, torch.float16)}


def _shared_pairs(code, device: torch.device) -> dict:
    """The shared byte-pair table's entries for a 16-value code (``packed_products.pair_words``), for bf16 and fp16
    activations, on ``device``: made with the weight, so never inside a CUDA graph capture (a copy from the host)."""
    return {dtype: packed_products.pair_words(code, dtype).to(device) for dtype in (torch.bfloat16, torch.float16)}


def int8_weight(weight: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    """Per-row int8 [N, K] with float32 scale [N] (``int8_linear.LinearWeights.weight``/``.scale``)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"int8 weight must be int8 [out, in], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    return QuantizedWeight("int8", weight.contiguous(), int(n), int(k), scale=scale.float().contiguous())


def quant_linear_torch(x: torch.Tensor, w: QuantizedWeight, bias=None, residual=None, *,
                       norm_weight=None, eps: float = 1e-5, swiglu: bool = False) -> torch.Tensor:
    """The same math in torch (float32 throughout): the CPU path and the tests' reference."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = xf @ w.dequantize(torch.float32).T
    if bias is not None:
        y = y + bias.float()
    if swiglu:
        a, b = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(a) * b
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAVE_TRITON:

    @triton.jit
    def _nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mask, NESTED: tl.constexpr, BS2: tl.constexpr):
        # float32 absmax of blocks blk; nested: code2[q] * absmax2[blk // BS2] + offset, as bitsandbytes decodes it
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0) + offset
        else:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return a

    @triton.jit
    def _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n, k0, K, NESTED: tl.constexpr,
                      BS: tl.constexpr, BS2: tl.constexpr, NB: tl.constexpr):
        # [BLOCK_N, NB]: the absmax of the NB whole blocks of each row from column k0 on (K % BS == 0)
        kblk = k0 // BS + tl.arange(0, NB)
        blk = rows[:, None] * (K // BS) + kblk[None, :]
        return _nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, blk, mask_n[:, None] & (kblk < K // BS)[None, :],
                           NESTED, BS2)

    @triton.jit
    def _dequant_4bit(
        w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n, k0, K,
        FMT: tl.constexpr, LUT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
        BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, SCALED: tl.constexpr = True,
    ):
        # weights of rows [BLOCK_N] (int64) at columns k0 + 2j (even) and k0 + 2j + 1 (odd), j < BLOCK_KH,
        # as float32 [BLOCK_N, BLOCK_KH] each; int4 without its row scale (applied to the sums); nf4 without
        # its absmax when not SCALED (the caller scales per-block sums instead)
        j = tl.arange(0, BLOCK_KH)
        kb = k0 // 2 + j  # byte column: row n starts at byte n * K / 2 in both formats
        mask = mask_n[:, None] & (kb < K // 2)[None, :]
        byte_idx = rows[:, None] * (K // 2) + kb[None, :]
        b = tl.load(w_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
        if FMT == 1:  # int4 release: int8 bytes, sign kept by arithmetic shifts
            ev = (b >> 4).to(tl.float32)
            od = ((b << 28) >> 28).to(tl.float32)
        else:  # nf4: uint8 bytes (zero-extended), codes looked up
            if LUT == 2:
                pair = tl.load(lut_ptr + b)  # int64: low word = code[b >> 4], high word = code[b & 15]
                ev = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
                od = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            else:
                ev = tl.load(code_ptr + (b >> 4))
                od = tl.load(code_ptr + (b & 15))
            if SCALED:
                if BLOCKED:  # K % BS == 0 and the tile holds whole blocks: one absmax per block, broadcast
                    NB: tl.constexpr = 2 * BLOCK_KH // BS
                    a = _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n, k0, K, NESTED, BS,
                                      BS2, NB)
                    a = tl.reshape(tl.broadcast_to(a[:, :, None], (BLOCK_N, NB, BS // 2)), (BLOCK_N, BLOCK_KH))
                else:  # blocks may straddle rows (K % BS != 0): the absmax of each byte's element pair
                    a = _nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, (byte_idx * 2) // BS, mask,
                                    NESTED, BS2)
                ev = ev * a
                od = od * a
        return ev, od

    @triton.jit
    def _scale_bias(acc, rn, mask_n, scale_ptr, bias_ptr, has_bias, HAS_SCALE: tl.constexpr):
        # acc [BM, BN] float32 sums of weight rows rn: times the row scale (int4/int8), plus the bias
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if has_bias:
            acc = acc + tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _epilogue(a, b, r, rm, rn, mask_m, mask_n, n_half, scale_ptr, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
                  has_bias, residual, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr):
        # a [BM, BN]: sums of weight rows rn (b: rows rn + n_half, SwiGLU); r [BM]: the RMSNorm factor of each
        # activation row (1 without the norm): a scalar per row, so applied to the sums (its weight went into x)
        a = _scale_bias(a * r[:, None], rn, mask_n, scale_ptr, bias_ptr, has_bias, HAS_SCALE)
        if SWIGLU:
            b = _scale_bias(b * r[:, None], rn + n_half, mask_n, scale_ptr, bias_ptr, has_bias, HAS_SCALE)
            a = a / (1.0 + tl.exp(-a)) * b
        mask = mask_m[:, None] & mask_n[None, :]
        if residual:
            a = a + tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], a.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_x(ptrs, mask, norm_ptrs, norm, F32: tl.constexpr):
        # an activation tile, times the RMSNorm weight when norm; and its squares summed along K (for the norm)
        # (the product in x's dtype is one rounding of the exact product, as float32-then-round would be; no
        # float32 copy of a [BLOCK_M, BLOCK_K] tile stays live next to the tile the dot reads)
        x = tl.load(ptrs, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        sq = tl.sum(xf * xf, axis=len(x.shape) - 1)
        if norm:
            x = (x * tl.load(norm_ptrs, mask=mask, other=0.0)).to(x.dtype)
        if F32:
            x = x.to(tl.float32)
        return x, sq

    @triton.jit
    def _dot_acc(x, w, acc, IEEE: tl.constexpr):
        # acc += x @ w.T on the tensor cores, w widened to x's dtype (exact for 4-bit and int8 values)
        if IEEE:
            return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        return tl.dot(x, tl.trans(w.to(x.dtype)), acc)

    @triton.jit
    def _gemv_tile(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n, k0, K, xe, xo,
                   FMT: tl.constexpr, LUT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
                   BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_SUM: tl.constexpr):
        # [BLOCK_N]: one tile's contribution to each row's sum, x's even/odd columns xe, xo [1, BLOCK_KH].
        # BLOCK_SUM (nf4, whole blocks): codes times x summed per 64-weight block first, then times the block's
        # absmax: two multiplies a byte fewer than scaling every weight
        if BLOCK_SUM:
            NB: tl.constexpr = 2 * BLOCK_KH // BS
            ev, od = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n,
                                   k0, K, FMT, LUT, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_KH, False)
            part = tl.sum(tl.reshape(ev * xe + od * xo, (BLOCK_N, NB, BS // 2)), axis=2)
            a = _block_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n, k0, K, NESTED, BS, BS2, NB)
            return tl.sum(part * a, axis=1)
        ev, od = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n,
                               k0, K, FMT, LUT, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_KH)
        return tl.sum(ev * xe + od * xo, axis=1)

    # has_bias, residual, norm: runtime flags (0/1), not specialised: one compiled kernel serves every linear
    @triton.jit(do_not_specialize=["has_bias", "residual", "norm"])
    def _gemv_quant_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset,
        scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, N, K, eps, stride_xm, stride_rm, stride_om,
        has_bias, residual, norm,
        FMT: tl.constexpr, LUT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
        BLOCKED: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_SUM: tl.constexpr, PDL: tl.constexpr,
    ):
        # program (n block, activation row m): BLOCK_N output columns of row m, a float32 per column.
        # N: output columns; with SWIGLU the weight has 2N rows and column n = silu(row n) * row n + N
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching; wait for ours
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rows = tl.where(mask_n, rn, 0).to(tl.int64)
        BLOCK_KH: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, BLOCK_KH)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([1], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ke = k0 + 2 * j
            xp = x_ptr + m * stride_xm + ke[None, :]
            xe, sq_e = _load_x(xp, (ke < K)[None, :], norm_ptr + ke[None, :], norm, True)
            xo, sq_o = _load_x(xp + 1, (ke + 1 < K)[None, :], norm_ptr + ke[None, :] + 1, norm, True)
            ss += sq_e + sq_o
            acc += _gemv_tile(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows, mask_n,
                              k0, K, xe, xo, FMT, LUT, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_KH, BLOCK_SUM)
            if SWIGLU:
                acc_b += _gemv_tile(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset, rows + N,
                                    mask_n, k0, K, xe, xo, FMT, LUT, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_KH,
                                    BLOCK_SUM)
        rm = tl.zeros([1], dtype=tl.int64) + m
        r = tl.where(norm != 0, tl.rsqrt(ss / K + eps), 1.0)
        _epilogue(acc[None, :], acc_b[None, :], r, rm, rn, rm >= 0, mask_n, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)

    # nor is M (the rows) in the kernels that take it: Triton would compile again for each new M % 16 of a
    # prompt, mid-request
    @triton.jit(do_not_specialize=["has_bias", "residual", "norm", "M"])
    def _mm_quant_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset,
        scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, M, N, K, eps, stride_xm, stride_rm, stride_om,
        has_bias, residual, norm, part_ptr, ss_ptr, K_SPLIT,
        FMT: tl.constexpr, LUT: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
        BLOCKED: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
        SPLIT_K: tl.constexpr = 1,
    ):
        # program (n block, m block, k split): out[BLOCK_M, BLOCK_N] through tl.dot, weights decoded in
        # registers (N, SWIGLU as in _gemv_quant_kernel). SPLIT_K > 1: the split's float32 sums go to
        # part [SPLIT_K, M, N (2N with SwiGLU)] and its squares of x to ss [SPLIT_K, M], and
        # _split_k_epilogue_kernel finishes them (in a fixed order: the result does not vary run to run)
        if PDL:  # programmatic dependent launch (Hopper): the next kernel may start launching; wait for ours
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        rows = tl.where(mask_n, rn, 0).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        if FMT == 2:  # int8 [N, K]: the weight tile as is
            kk = tl.arange(0, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                mk = (k0 + kk < k_hi)[None, :]
                xa, sq = _load_x(x_ptr + rm[:, None] * stride_xm + k0 + kk[None, :], mask_m[:, None] & mk,
                                 norm_ptr + k0 + kk[None, :], norm, False)
                ss += sq
                w = tl.load(w_ptr + rows[:, None] * K + k0 + kk[None, :], mask=mask_n[:, None] & mk, other=0)
                acc = _dot_acc(xa, w, acc, IEEE)
                if SWIGLU:
                    w = tl.load(w_ptr + (rows + N)[:, None] * K + k0 + kk[None, :], mask=mask_n[:, None] & mk, other=0)
                    acc_b = _dot_acc(xa, w, acc_b, IEEE)
        else:  # 4-bit: even and odd columns as two half-width dots
            BLOCK_KH: tl.constexpr = BLOCK_K // 2
            j = tl.arange(0, BLOCK_KH)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ke = k0 + 2 * j
                xp = x_ptr + rm[:, None] * stride_xm + ke[None, :]
                xe, sq_e = _load_x(xp, mask_m[:, None] & (ke < k_hi)[None, :], norm_ptr + ke[None, :], norm, False)
                mo = mask_m[:, None] & (ke + 1 < k_hi)[None, :]
                xo, sq_o = _load_x(xp + 1, mo, norm_ptr + ke[None, :] + 1, norm, False)
                ss += sq_e + sq_o
                ev, od = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset,
                                       rows, mask_n, k0, K, FMT, LUT, NESTED, BS, BS2, BLOCKED, BLOCK_N, BLOCK_KH)
                acc = _dot_acc(xo, od, _dot_acc(xe, ev, acc, IEEE), IEEE)
                if SWIGLU:
                    ev, od = _dequant_4bit(w_ptr, absmax_ptr, code_ptr, lut_ptr, code2_ptr, absmax2_ptr, offset,
                                           rows + N, mask_n, k0, K, FMT, LUT, NESTED, BS, BS2, BLOCKED,
                                           BLOCK_N, BLOCK_KH)
                    acc_b = _dot_acc(xo, od, _dot_acc(xe, ev, acc_b, IEEE), IEEE)
        if SPLIT_K == 1:
            r = tl.where(norm != 0, tl.rsqrt(ss / K + eps), 1.0)
            _epilogue(acc, acc_b, r, rm, rn, mask_m, mask_n, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                      stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)
        else:
            NC: tl.constexpr = 2 if SWIGLU else 1
            mask = mask_m[:, None] & mask_n[None, :]
            part = part_ptr + (pid_s * M + rm[:, None]) * (NC * N) + rn[None, :]
            tl.store(part, acc, mask=mask)
            if SWIGLU:
                tl.store(part + N, acc_b, mask=mask)
            if pid_n == 0:
                tl.store(ss_ptr + pid_s * M + rm, ss, mask=mask_m)

    @triton.jit(do_not_specialize=["has_bias", "residual", "norm", "M"])
    def _rows_int8_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, M, N, K, eps, stride_xm, stride_rm, stride_om,
        has_bias, residual, norm,
        SWIGLU: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # program (n block): BLOCK_N int8 weight rows read once, long K tiles, against all M <= ROWS activation
        # rows (a GEMV for a few rows: tensor-core tiles would compute 16 rows to use 2 and keep fewer weight
        # bytes in flight); float32 sums [ROWS, BLOCK_N]
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rows = tl.where(mask_n, rn, 0).to(tl.int64)
        rm = tl.arange(0, ROWS).to(tl.int64)
        mask_m = rm < M
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        acc_b = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mk = k0 + kk < K
            x, sq = _load_x(x_ptr + rm[:, None] * stride_xm + k0 + kk[None, :], mask_m[:, None] & mk[None, :],
                            norm_ptr + k0 + kk[None, :], norm, True)
            ss += sq
            w = tl.load(w_ptr + rows[:, None] * K + k0 + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0)
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            if SWIGLU:
                w = tl.load(w_ptr + (rows + N)[:, None] * K + k0 + kk[None, :], mask=mask_n[:, None] & mk[None, :],
                            other=0)
                acc_b += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        r = tl.where(norm != 0, tl.rsqrt(ss / K + eps), 1.0)
        _epilogue(acc, acc_b, r, rm, rn, mask_m, mask_n, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_om, has_bias, residual, True, SWIGLU)

    @triton.jit(do_not_specialize=["has_bias", "residual", "norm", "M"])
    def _split_k_epilogue_kernel(
        part_ptr, ss_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, eps, stride_rm, stride_om,
        has_bias, residual, norm,
        SPLIT_K: tl.constexpr, HAS_SCALE: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # program (n block, activation row m): the splits' sums added in order, then _mm_quant_kernel's epilogue
        pid_n = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        NC: tl.constexpr = 2 if SWIGLU else 1
        a = tl.zeros([BLOCK_N], dtype=tl.float32)
        b = tl.zeros([BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([1], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            row = part_ptr + (s * M + m) * (NC * N)
            a += tl.load(row + rn, mask=mask_n, other=0.0)
            if SWIGLU:
                b += tl.load(row + N + rn, mask=mask_n, other=0.0)
            ss += tl.load(ss_ptr + s * M + m + tl.zeros([1], dtype=tl.int64))
        rm = tl.zeros([1], dtype=tl.int64) + m
        r = tl.where(norm != 0, tl.rsqrt(ss / K + eps), 1.0)
        _epilogue(a[None, :], b[None, :], r, rm, rn, rm >= 0, mask_n, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_om, has_bias, residual, HAS_SCALE, SWIGLU)


# ---------------------------------------------------------------------------------------------
# configs and the wrapper


@dataclass(frozen=True)
class QuantLinearConfig:
    kernel: str = "gemv"  # "gemv" (a row a program column, float32 row sums), "mm" (tl.dot tiles),
    # "rows" (int8: every activation row, up to block_m, against weight rows read once; float32 sums) or
    # "words" (quant_words.py: the weight read as 32-bit words, block_m = 1 or 2 rows a program; 4-bit here,
    # int8 through gemv_rows) or "persistent" (quant_persistent.py: one row, 4-bit, a few programs an SM looping
    # over blocks of block_n weight rows, the whole of K a tile)
    block_n: int = 8
    block_k: int = 512  # weights (not bytes) along K a tile
    block_m: int = 16  # mm only
    num_warps: int = 4
    num_stages: int = 1
    lut: int = 2  # nf4: 1 = a gather per nibble, 2 = a gather per byte from the pair table; words, 4-bit:
    # 3 = the code in registers, products two at a time in the rows' 16-bit type (packed_products.py); persistent
    # also 4 = a byte-pair table in shared memory, products as 3
    block_sum: bool = True  # gemv, nf4 with whole blocks: absmax applied to per-block sums (else per weight)
    split_k: int = 1  # mm only: K in this many parts, each its own program (more programs for a short N)
    cvt: int = 1  # words, int8: 1 = int8 to float32 by an exponent trick, 0 = by the conversion instruction
    prefetch: bool = False  # words: the first K step's words asked for before the wait on the kernel ahead (PDL)
    programs_per_sm: int = 0  # persistent: programs on each multiprocessor
    # persistent: blocks asked of L2 this far ahead of their loads (kernels/weight_prefetch.py; 0: none). Out of repr,
    # which the tuning digests hash: the tiles a card picked before this field existed stay valid
    l2_ahead: int = field(default=0, repr=False)


def m_bucket(m: int) -> int:
    """The tuning bucket of M rows: the next power of two (configs are tuned per bucket)."""
    return next((b for b in M_BUCKETS if m <= b), 1 << max(0, m - 1).bit_length())


def candidate_configs(fmt: str, m: int, swiglu: bool = False) -> list[QuantLinearConfig]:
    """Configs tried when tuning; the first is the default. 4-bit: row-sum GEMV tiles at M = 1, both kinds up
    to M = 8 (GEMV first up to 4), tensor-core tiles above; int8 (M >= 2 only): tensor-core tiles.
    The tensor-core tiles are those that compile for sm_90 without register spills at that BLOCK_M
    (ptxas resource usage, checked per format); narrow ones (16, 32 columns) give a 4608-row weight enough
    programs at small M. SwiGLU reads two weight rows an output column: half the columns a tile, which keeps
    those tiles free of spills too."""
    bm = max(16, min(64, m_bucket(m)))
    if bm <= 32:  # (block_n, block_k, warps, stages, K splits)
        tiles = [(32, 128, 4, 3, 1), (16, 256, 4, 3, 1), (64, 128, 8, 3, 1), (32, 64, 4, 4, 1), (32, 256, 8, 2, 1),
                 (64, 64, 4, 4, 1)]
        # long K tiles and K splits: more weight bytes in flight a multiprocessor, which a memory-bound
        # product needs (a 4096-row weight gives 128-256 programs of 16-32 rows, one or two an SM)
        tiles += [(16, 512, 4, 3, 1), (32, 512, 4, 3, 1), (32, 128, 4, 3, 4), (64, 128, 8, 3, 4), (16, 256, 4, 3, 2)]
    else:  # 64 activation rows: 8 warps share the [64, block_n] accumulator
        tiles = [(64, 64, 8, 3, 1), (32, 64, 8, 3, 1), (32, 128, 8, 3, 1), (64, 128, 8, 3, 1),
                 (64, 64, 8, 3, 4), (128, 64, 8, 3, 4), (64, 128, 8, 3, 2), (128, 64, 8, 3, 8)]
    mm = [QuantLinearConfig("mm", bn, bk, bm, w, st, 2, split_k=sk) for bn, bk, w, st, sk in tiles]
    if fmt == "int8":
        if m <= 8:  # a few rows: the multi-row GEMV first, with long K tiles for bytes in flight
            rows = [QuantLinearConfig("rows", bn, bk, m_bucket(m), w, 1) for bn, bk, w in
                    ((4, 512, 4), (8, 256, 4), (2, 1024, 4), (8, 512, 8), (4, 1024, 8))]
            mm = rows + mm
        return _halved(mm) if swiglu else mm
    gemv = [QuantLinearConfig("gemv", bn, bk, 16, w, 1, 2) for bn, bk, w in
            ((8, 512, 4), (4, 1024, 4), (16, 256, 4), (8, 1024, 8))]
    if fmt == "nf4":  # the 16-entry table (two gathers a byte, less table in L1); absmax on every weight
        gemv += [QuantLinearConfig("gemv", 8, 512, 16, 4, 1, 1), QuantLinearConfig("gemv", 8, 512, 16, 4, 1, 2, False)]
    if m == 1:  # bigger tiles too: more bytes in flight a thread (Triton does not pipeline these loops)
        chosen = gemv + [QuantLinearConfig("gemv", bn, bk, 16, 8, 1, 2) for bn, bk in ((16, 1024), (8, 2048))]
        chosen += _words_configs(1, fmt) + _persistent_configs(1)
    elif m <= 4:
        chosen = gemv[:4] + _words_configs(2, fmt) + (_persistent_configs(2) if m == 2 else []) + mm
    else:
        chosen = mm + gemv[:4] if m <= 8 else mm
    return _halved(chosen) if swiglu else chosen


def _words_configs(rows: int, fmt: str) -> list[QuantLinearConfig]:
    """quant_words' tiles: (output rows, weights along K, warps); NF4 with the 16-entry table, and with the
    byte-pair table (one gather a byte, but over 16 cache lines) at the tile shapes that won on the H100 by GPU
    time (two weight rows a program, bench/NOTES.md run 20), where loads, not arithmetic, fill the loop.
    A one-row linear is a few microseconds of reads: the whole weight is about one wave of the GPU's threads
    (a 4608 x 4096 weight is ~9 words a thread), so the tiles run from a few weight rows a program (many
    programs, a short K loop) to 16 (activations reused across the rows a thread holds)."""
    if os.environ.get("GLMCHAT_WORDS_GEMV", "1") == "0":  # A/B switch for bench/ (not a user setting)
        return []
    tiles = ((4, 1024, 4), (2, 1024, 4), (4, 2048, 4), (2, 2048, 4), (8, 1024, 4), (8, 512, 4), (16, 512, 4),
             (4, 512, 2), (2, 512, 2))
    if rows == 2:
        tiles = ((4, 1024, 4), (2, 1024, 4), (4, 2048, 4), (8, 1024, 4), (16, 512, 4))
    configs = [QuantLinearConfig("words", bn, bk, rows, w, 1, 1) for bn, bk, w in tiles]
    if fmt == "nf4":
        pair_tiles = ((4, 1024, 4), (2, 1024, 4), (2, 2048, 4)) if rows == 1 else ((4, 1024, 4), (2, 1024, 4))
        configs += [QuantLinearConfig("words", bn, bk, rows, w, 1, 2) for bn, bk, w in pair_tiles]
    if fmt != "int8" and packed_products.tried():
        # last, programs of one or two warps: the row sums and the norm's sum of squares reduce within a warp
        # (shuffles, no shared memory or barrier at the end of every program), and more programs fit an SM
        table_tiles = ((2, 1024, 4), (2, 2048, 4), (4, 1024, 4), (4, 2048, 4), (8, 1024, 4), (2, 4096, 8),
                       (8, 2048, 4), (16, 1024, 4), (16, 2048, 8), (2, 1024, 1), (4, 1024, 1), (2, 2048, 2),
                       (4, 1024, 2))
        if rows == 2:
            table_tiles = ((2, 1024, 4), (4, 1024, 4), (2, 2048, 4))
        configs += [QuantLinearConfig("words", bn, bk, rows, w, 1, 3) for bn, bk, w in table_tiles]
    return configs


def _persistent_configs(rows: int) -> list[QuantLinearConfig]:
    """quant_persistent's tiles at one or two activation rows, with the register and the shared table (16-bit rows
    on a GPU; else, at one row, the 16-entry table): (weight rows a block, warps, programs an SM). 4 warps give a thread 4
    words of a 4096-long row (one 16-byte load a row); 8 warps halve the registers for fc2's 13696 (ptxas sm_90: at
    2 rows a block and 8 warps 137 registers under Triton 3.6, none spilled; 4 warps spill there)."""
    if os.environ.get("GLMCHAT_PERSISTENT_GEMV", "1") == "0":  # A/B switch for bench/ (not a user setting)
        return []
    tiles = ((2, 4, 4), (4, 4, 2), (2, 8, 2), (4, 8, 1))
    if rows == 1 and untested_persistent_tiles():  # 8 rows a block: more of qkv's and dense's bytes in flight an SM
        tiles += ((8, 8, 2),)  # (128 registers at one row, 193 with SwiGLU: ptxas sm_90; bench/NOTES.md session 46)
    luts = (3, 4) if packed_products.tried() else (1,) if rows == 1 else ()
    configs = [QuantLinearConfig("persistent", bn, 0, rows, w, 1, lut, programs_per_sm=p) for lut in luts
               for bn, w, p in tiles]
    if untested_persistent_tiles() and packed_products.tried() and weight_prefetch.tried():
        # the tiles the H100 picked (run 55), with blocks asked of L2 2 or 4 blocks ahead (the registers ptxas -v
        # gives are unchanged: 96 at qkv's 2 rows and 4 warps, 128 at fc2's 8 warps)
        configs += [QuantLinearConfig("persistent", bn, 0, rows, w, 1, 4, programs_per_sm=p, l2_ahead=ahead)
                    for bn, w, p in ((2, 4, 4), (2, 8, 2)) for ahead in weight_prefetch.BLOCKS_AHEAD]
    return configs


def _halved(configs: list[QuantLinearConfig]) -> list[QuantLinearConfig]:
    out: list[QuantLinearConfig] = []
    for c in configs:
        h = replace(c, block_n=max(16 if c.kernel == "mm" else 1 if c.kernel == "rows" else 2, c.block_n // 2))
        if h not in out:
            out.append(h)
    return out


def _launch(x, w: QuantizedWeight, out, bias, residual, norm_weight, eps: float, swiglu: bool,
            cfg: QuantLinearConfig, pdl: bool = False, rope=None) -> None:
    M = x.shape[0]
    n_out = w.n // 2 if swiglu else w.n
    nf4 = w.fmt == "nf4"
    dummy = out
    absmax = w.absmax if nf4 else dummy
    code = w.code if nf4 else dummy
    lut = w.pair_table() if nf4 and cfg.lut == 2 else dummy
    code2 = w.code2 if w.nested else dummy
    absmax2 = w.absmax2 if w.nested else dummy
    res = residual if residual is not None else dummy
    blocked = nf4 and w.k % w.blocksize == 0 and cfg.block_k % w.blocksize == 0 and cfg.block_k >= w.blocksize
    common = dict(
        FMT=_FMT_ID[w.fmt], LUT=cfg.lut, NESTED=w.nested, BS=w.blocksize if nf4 else 2, BS2=w.blocksize2,
        BLOCKED=blocked, HAS_SCALE=w.scale is not None, SWIGLU=swiglu,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        PDL=pdl, **({"launch_pdl": True} if pdl else {}),
    )
    bias_arg = bias if bias is not None else dummy
    norm_arg = norm_weight if norm_weight is not None else dummy
    args = (x, w.data, absmax, code, lut, code2, absmax2, w.offset, w.scale if w.scale is not None else dummy,
            bias_arg, norm_arg, res, out)
    flags = (int(bias is not None), int(residual is not None), int(norm_weight is not None))
    if cfg.kernel == "words":
        _quant_words().launch(x, w, out, bias, residual, norm_weight, eps, swiglu, cfg, pdl, lut, dummy, rope=rope)
    elif cfg.kernel == "persistent":
        _quant_persistent().launch(x, w, out, bias, residual, norm_weight, eps, swiglu, cfg, pdl, dummy)
    elif cfg.kernel == "rows":
        if w.fmt != "int8" or M > cfg.block_m:
            raise ValueError(f"the rows kernel takes int8 weights and at most block_m={cfg.block_m} rows")
        _rows_int8_kernel[(triton.cdiv(n_out, cfg.block_n),)](
            x, w.data, w.scale, bias_arg, norm_arg, res, out, M, n_out, w.k, eps, x.stride(0), res.stride(0),
            out.stride(0), *flags, SWIGLU=swiglu, ROWS=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.kernel == "gemv" and w.fmt != "int8":
        grid = (triton.cdiv(n_out, cfg.block_n), M)
        _gemv_quant_kernel[grid](*args, n_out, w.k, eps, x.stride(0), res.stride(0), out.stride(0), *flags,
                                 BLOCK_SUM=blocked and cfg.block_sum, **common)
    else:
        splits, k_split = _k_splits(w.k, cfg)
        part = ss = dummy
        if splits > 1:
            part = torch.empty(splits, M, w.n if swiglu else n_out, device=x.device, dtype=torch.float32)
            ss = torch.empty(splits, M, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(n_out, cfg.block_n), triton.cdiv(M, cfg.block_m), splits)
        _mm_quant_kernel[grid](*args, M, n_out, w.k, eps, x.stride(0), res.stride(0), out.stride(0), *flags,
                               part, ss, k_split, IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m,
                               SPLIT_K=splits, **common)
        if splits > 1:
            _split_k_epilogue_kernel[(triton.cdiv(n_out, 256), M)](
                part, ss, w.scale if w.scale is not None else dummy, bias if bias is not None else dummy, res, out,
                M, n_out, w.k, eps, res.stride(0), out.stride(0), *flags, SPLIT_K=splits,
                HAS_SCALE=w.scale is not None, SWIGLU=swiglu, BLOCK_N=256, num_warps=4)


def _k_splits(k: int, cfg: QuantLinearConfig) -> tuple[int, int]:
    """(splits, weights along K a split): whole BLOCK_K tiles a split, no split left empty."""
    tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(tiles, max(1, min(cfg.split_k, tiles)))
    return triton.cdiv(tiles, per_split), per_split * cfg.block_k


_chosen: dict[tuple, QuantLinearConfig] = {}  # (key, device) -> config: the hot path is one dict lookup


def tuned_config(w: QuantizedWeight, m: int, dtype: torch.dtype, device: torch.device, *, swiglu: bool = False,
                 pdl: bool = False, timer=None) -> QuantLinearConfig:
    """The config for this weight at M rows on this GPU model: cached, else tuned now on scratch buffers
    (their own random generator: tuning leaves the global RNG, and so seeded sampling, untouched)."""
    bucket = m_bucket(m)
    nest = "n" if w.nested else ""
    variant = "|swiglu" if swiglu else ""  # (norm, bias and residual are runtime flags of the same kernel)
    key = f"quant_linear|{w.fmt}{nest}|bs{w.blocksize}|N{w.n}|K{w.k}|M{bucket}|{str(dtype).split('.')[-1]}{variant}"
    memo = (key, str(device))
    if memo in _chosen and timer is None:
        return _chosen[memo]
    scratch: dict = {}

    def run(cfg: QuantLinearConfig) -> torch.Tensor:
        if not scratch:
            gen = torch.Generator(device=device).manual_seed(0)
            scratch["x"] = torch.randn(bucket, w.k, device=device, generator=gen).to(dtype)
            scratch["out"] = torch.empty(bucket, w.n // 2 if swiglu else w.n, device=device, dtype=dtype)
        _launch(scratch["x"], w, scratch["out"], None, None, None, 1e-5, swiglu, cfg, pdl)  # pdl: same compile
        return scratch["out"]

    candidates = candidate_configs(w.fmt, bucket, swiglu)
    if dtype not in w.table_registers:  # the register and shared tables' products are 16-bit (packed_products)
        candidates = [c for c in candidates if c.lut < 3]
    cfg = tuning.pick(key, candidates, run, device, timer=timer)
    if not tuning.capturing(device):
        _chosen[memo] = cfg  # (during a capture the default stands in; tuned at the next call outside one)
    return cfg


def quant_linear(
    x: torch.Tensor,
    w: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    residual: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    swiglu: bool = False,
    out: Optional[torch.Tensor] = None,
    config: Optional[QuantLinearConfig] = None,
    batch_invariant: bool = False,
    pdl: bool = False,
    rope=None,
) -> torch.Tensor:
    """``out = epilogue(norm(x) @ W.T + bias)`` from the packed weight; float32 sums, x's dtype out.

    x: [M, K] with unit stride along K (rows may be strided), bf16/fp16/fp32. ``norm_weight`` [K]: RMSNorm
    each row of x first (eps; the norm weight multiplies x, the row's 1/rms the sums). ``swiglu``: W has 2F
    rows, out [M, F] = silu(y[:, :F]) * y[:, F:] (ChatGLM2's dense_h_to_4h). ``residual`` [M, N_out]: added
    last; may be ``out`` itself (in place). On CUDA with Triton the kernels run (config: ``config``, else
    the one tuned for this GPU model, M bucket, shape and variant, tuned on first use outside graph
    capture); elsewhere ``quant_linear_torch``.
    ``batch_invariant``: every M uses the config tuned for 16 rows (tensor-core tiles of 16 rows), so a row's
    result does not depend on how many rows share the batch (bitwise; for evaluation whose predictions must
    not depend on the batch size, and batch rows equal to single-stream replies). The default picks the
    fastest config per M bucket, whose rounding differs between buckets. ``pdl``: launch as a programmatic
    dependent of the previous kernel (Hopper and later; inside one CUDA graph of kernels that all use it).
    ``rope`` (an ``attention_batch.RopeWrite``; a QKV weight, kernels only): then q and k are rotated, q left in
    out's first H * D columns and k and v written to each row's cache slot, in the words kernel's epilogue where
    the config is one of its tiles, else by the rotary kernel after; returns the rotated q [M, H, D].
    """
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"activations must be [M, {w.k}], got {tuple(x.shape)}")
    if swiglu and w.n % 2:
        raise ValueError(f"swiglu needs an even number of weight rows, got {w.n}")
    if rope is not None and (residual is not None or swiglu or not kernels_run(x)):
        raise ValueError("the rotary epilogue is for a QKV linear's kernels: no residual or SwiGLU")
    if not kernels_run(x):
        y = quant_linear_torch(x, w, bias, residual, norm_weight=norm_weight, eps=eps, swiglu=swiglu)
        return y if out is None else out.copy_(y)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], w.n // 2 if swiglu else w.n, device=x.device, dtype=x.dtype)
    cfg = config or tuned_config(w, 16 if batch_invariant else x.shape[0], x.dtype, x.device, swiglu=swiglu, pdl=pdl)
    if config is None and not _usable(cfg, x, w, norm_weight):
        cfg = candidate_configs(w.fmt, m_bucket(x.shape[0]), swiglu)[0]  # tuned on aligned buffers; this one is not
    if rope is None:
        _launch(x, w, out, bias, residual, norm_weight, eps, swiglu, cfg, pdl)
        return out
    if _quant_words().takes_rope(cfg):
        _launch(x, w, out, bias, None, norm_weight, eps, False, cfg, pdl, rope=rope)
        return rope.q_view(out)
    _launch(x, w, out, bias, None, norm_weight, eps, False, cfg, pdl)
    return rope.after(out, pdl=pdl)


def _usable(cfg: QuantLinearConfig, x: torch.Tensor, w: QuantizedWeight, norm_weight) -> bool:
    """Whether a tuned config's kernel can read this call (the tuner used aligned scratch buffers)."""
    if cfg.kernel == "words":
        return _quant_words().usable(x, w, norm_weight, cfg.lut)
    if cfg.kernel == "persistent":
        return _quant_persistent().usable(x, w, norm_weight, cfg.lut)
    return True


def _quant_words():
    """``kernels.quant_words``, imported on first use (it imports this module)."""
    from . import quant_words

    return quant_words


def _quant_persistent():
    """``kernels.quant_persistent``, imported on first use (it imports this module)."""
    from . import quant_persistent

    return quant_persistent


def kernels_run(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x: on CUDA, or under Triton's interpreter (the CPU tests)."""
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
