"""A GEMV for a few activation rows (2-4: compare's two replies, a server's first streams, the tail of an
evaluation) against int8 or 16-bit weights: each weight tile is read once for all the rows, in the one-row GEMV's
form.

Why its own kernel: at 2-4 rows a decode step's linears are bound by the weight bytes read, as at one row.
``int8_matmul.matmul`` reads them through tensor-core tiles 16 rows tall (2 of them used), and
``gemv_4bit``'s ``rows`` kernel sums a [rows, n, k] product whose layout Triton spreads across threads; the
one-row GEMV (``int8_gemv.gemv``: 2D tiles, float32 row sums, the int8 widened by one integer op) is the
fastest reader of these weights measured so far (a step of 2.53 ms at one row against 3.51 ms at two rows
through the matmul, bench/NOTES.md run 11). So this kernel is that GEMV with one set of row sums per
activation row, unrolled for up to ``ROWS_MAX`` rows (no list of tensors in Triton): only x is read once a
row (twice where RMSNorm or the widening's offset needs its sums).

Fused as in the batched decoder's linears: RMSNorm before (its weight multiplies x, the row's 1/rms the sums),
then the row scale (int8), the bias, and either SwiGLU (``silu(W[:F] x) * W[F:] x``) or the residual add.
The tile config is tuned on first use per GPU model and shape (``tuning.pick``, cached on disk), against the
caller's matmul path for the same rows: a card where that path is faster keeps it. For 16-bit weights that path
is cuBLAS with RMSNorm, SwiGLU and the residual as launches of their own (a bf16 compare's two rows: 1.77x one
reply on the H100, bench/NOTES.md run 41); here they are folded in as for int8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import (packed_products, persistent_gemv, quant_words, tuning, untested_persistent_tiles, weight_prefetch,
               x_pass_width)
from .gemv_4bit import HAVE_TRITON, QuantizedWeight, QuantLinearConfig, int8_weight

if TYPE_CHECKING:
    from ..int8_linear import LinearWeights

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .int8_gemv import _x_sums, int8_as_float

ROWS_MIN, ROWS_MAX = 2, 4

if HAVE_TRITON:

    @triton.jit
    def _load_row(x_ptr, g, kk, K, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        # one activation row's K tile in float32, times the norm weight g
        if EVEN_K:
            x = tl.load(x_ptr + kk).to(tl.float32)
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        if NORM:
            x = x * g
        return x

    @triton.jit
    def _load_norm(norm_ptr, kk, K, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        if NORM:
            if EVEN_K:
                return tl.load(norm_ptr + kk).to(tl.float32)
            return tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        return tl.zeros(kk.shape, dtype=tl.float32)

    @triton.jit
    def _as_float(w, W_INT8: tl.constexpr, CVT: tl.constexpr):
        if W_INT8:
            return int8_as_float(w, CVT)
        return w.to(tl.float32)

    @triton.jit
    def _accumulate(acc, w, x, TILE_ACC: tl.constexpr):
        # TILE_ACC: a float32 per weight of the tile, summed once after the K loop (no reduction across threads
        # inside it); else each tile reduced to a sum per weight row
        if TILE_ACC:  # (both branches spelled out: Triton compiles what follows a constexpr branch's return too)
            acc = acc + w * x[None, :]
        else:
            acc = acc + tl.sum(w * x[None, :], axis=1)
        return acc

    @triton.jit
    def _row_sums(acc, TILE_ACC: tl.constexpr):
        if TILE_ACC:
            acc = tl.sum(acc, axis=1)
        return acc

    @triton.jit
    def _row_stats(x_ptr, norm_ptr, K, eps, X_PASS: tl.constexpr, CVT: tl.constexpr, NORM: tl.constexpr):
        # a row's 1/rms and CVT 2's offset (1.5 x the sum of the normed x), in a pass of their own over x (a few KB,
        # mostly from L1/L2; X_PASS wide, kernels.x_pass_width) so that the weight loop keeps nothing per K element;
        # no pass when neither is needed
        r = 1.0
        off = 0.0
        if NORM or CVT == 2:
            ss, xs = _x_sums(x_ptr, norm_ptr, K, X_PASS, NORM)
            if NORM:
                r = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            if CVT == 2:
                off = 1.5 * tl.sum(xs, axis=0)
        return r, off

    @triton.jit
    def _row_out(acc_a, acc_b, r, off, row, n, mask_n, F_OFF, scale_ptr, bias_ptr, res_ptr, out_ptr, stride_rm,
                 stride_om, W_INT8: tl.constexpr, CVT: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                 SWIGLU: tl.constexpr):
        # one activation row's outputs: CVT 2's offset removed, 1/rms, scale (int8) and bias, then SwiGLU or the
        # residual
        a = acc_a
        b = acc_b
        if CVT == 2:
            a = (a - off) * 256.0
            b = (b - off) * 256.0
        a = a * r
        if W_INT8:
            a = a * tl.load(scale_ptr + n, mask=mask_n, other=0.0)
        if HAS_BIAS:
            a = a + tl.load(bias_ptr + n, mask=mask_n, other=0.0).to(tl.float32)
        if SWIGLU:
            b = b * r
            if W_INT8:
                b = b * tl.load(scale_ptr + F_OFF + n, mask=mask_n, other=0.0)
            if HAS_BIAS:
                b = b + tl.load(bias_ptr + F_OFF + n, mask=mask_n, other=0.0).to(tl.float32)
            y = a / (1.0 + tl.exp(-a)) * b
        else:
            y = a
            if RESIDUAL:
                y = y + tl.load(res_ptr + row * stride_rm + n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gemv_rows_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        N_OUT, F_OFF, K, stride_xm, stride_rm, stride_om, eps,
        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_INT8: tl.constexpr, CVT: tl.constexpr,
        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, X_PASS: tl.constexpr, TILE_ACC: tl.constexpr,
    ):
        # program: BLOCK_N output columns (SwiGLU: their gate rows n and up rows F_OFF + n), read once for ROWS rows
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < N_OUT
        offs_k = tl.arange(0, BLOCK_K)
        wa_ptrs = w_ptr + n.to(tl.int64)[:, None] * K + offs_k[None, :]
        wb_ptrs = w_ptr + (n + F_OFF).to(tl.int64)[:, None] * K + offs_k[None, :]
        if TILE_ACC:
            a0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            a0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        a1, a2, a3, b0, b1, b2, b3 = a0, a0, a0, a0, a0, a0, a0
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K and EVEN_N:
                wa = tl.load(wa_ptrs + k0)
            else:
                wa = tl.load(wa_ptrs + k0, mask=mask_n[:, None] & (kk < K)[None, :], other=0)
            wa = _as_float(wa, W_INT8, CVT)
            wb = wa
            if SWIGLU:
                if EVEN_K and EVEN_N:
                    wb = tl.load(wb_ptrs + k0)
                else:
                    wb = tl.load(wb_ptrs + k0, mask=mask_n[:, None] & (kk < K)[None, :], other=0)
                wb = _as_float(wb, W_INT8, CVT)
            g = _load_norm(norm_ptr, kk, K, NORM, EVEN_K)
            # unrolled by hand for up to ROWS_MAX rows: a Triton loop cannot index a list of accumulators
            x = _load_row(x_ptr, g, kk, K, NORM, EVEN_K)
            a0 = _accumulate(a0, wa, x, TILE_ACC)
            if SWIGLU:
                b0 = _accumulate(b0, wb, x, TILE_ACC)
            x = _load_row(x_ptr + stride_xm, g, kk, K, NORM, EVEN_K)
            a1 = _accumulate(a1, wa, x, TILE_ACC)
            if SWIGLU:
                b1 = _accumulate(b1, wb, x, TILE_ACC)
            if ROWS > 2:
                x = _load_row(x_ptr + 2 * stride_xm, g, kk, K, NORM, EVEN_K)
                a2 = _accumulate(a2, wa, x, TILE_ACC)
                if SWIGLU:
                    b2 = _accumulate(b2, wb, x, TILE_ACC)
            if ROWS > 3:
                x = _load_row(x_ptr + 3 * stride_xm, g, kk, K, NORM, EVEN_K)
                a3 = _accumulate(a3, wa, x, TILE_ACC)
                if SWIGLU:
                    b3 = _accumulate(b3, wb, x, TILE_ACC)
        a0, a1, a2, a3 = (_row_sums(a0, TILE_ACC), _row_sums(a1, TILE_ACC), _row_sums(a2, TILE_ACC),
                          _row_sums(a3, TILE_ACC))
        b0, b1, b2, b3 = (_row_sums(b0, TILE_ACC), _row_sums(b1, TILE_ACC), _row_sums(b2, TILE_ACC),
                          _row_sums(b3, TILE_ACC))
        outs = (F_OFF, scale_ptr, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om, W_INT8, CVT, HAS_BIAS, RESIDUAL,
                SWIGLU)
        r, off = _row_stats(x_ptr, norm_ptr, K, eps, X_PASS, CVT, NORM)
        _row_out(a0, b0, r, off, 0, n, mask_n, *outs)
        r, off = _row_stats(x_ptr + stride_xm, norm_ptr, K, eps, X_PASS, CVT, NORM)
        _row_out(a1, b1, r, off, 1, n, mask_n, *outs)
        if ROWS > 2:
            r, off = _row_stats(x_ptr + 2 * stride_xm, norm_ptr, K, eps, X_PASS, CVT, NORM)
            _row_out(a2, b2, r, off, 2, n, mask_n, *outs)
        if ROWS > 3:
            r, off = _row_stats(x_ptr + 3 * stride_xm, norm_ptr, K, eps, X_PASS, CVT, NORM)
            _row_out(a3, b3, r, off, 3, n, mask_n, *outs)


@dataclass(frozen=True)
class RowsGemvConfig:
    block_n: int = 8  # output columns a program (SwiGLU: that many gate rows and as many up rows)
    block_k: int = 1024  # weights along K a tile
    num_warps: int = 4
    cvt: int = 2  # int8 -> float32 as int8_gemv.int8_as_float; words: quant_words' cvt (3: fp16 pairs,
    # packed_products.int8_dot)
    kernel: str = "gemv"  # "words": kernels.quant_words (the weight as 32-bit words, row sums kept in registers
    # until the K loop ends: no barrier inside it); "gemv_acc": this kernel with a float32 per weight of the tile,
    # summed after the K loop (16-bit weights: the one-row GEMV's fc1 and fc2 tiles do that); "persistent":
    # kernels/persistent_gemv.py at two rows (block_n row pairs a block, programs_per_sm programs an SM);
    # "other": the caller's other path (the int8 matmul, or cuBLAS) ran faster
    programs_per_sm: int = field(default=0, repr=False)  # (out of repr, as int8_gemv.GemvConfig's)
    # persistent: blocks asked of L2 this far ahead of their loads (kernels/weight_prefetch.py; 0: none)
    l2_ahead: int = field(default=0, repr=False)


def candidate_configs(swiglu: bool, int8: bool = True) -> list[RowsGemvConfig]:
    """Configs tried when tuning, the default first: the one-row GEMV's best tiles on the H100/H200 (8 weight rows
    of 1024 a program, bench/NOTES.md run 5), then shorter and longer tiles, and the plain int8 conversion (which
    needs no offset, so a linear without RMSNorm makes no second pass over x). (Int8 tiles summed after the K loop
    were tried and neither the H100 nor the H200 picked one, bench/NOTES.md run 51.) Each is compiled and timed
    for five weights at 2 and 4 rows the first time a card runs them (the batched decoder's warm-up, or a first
    compare). At 4 rows, 128 threads and these tiles use 118-168 registers without spills on sm_90 (ptxas).
    Then quant_words' tiles (two rows a program; 3-4 rows as two pairs), unless ``GLMCHAT_WORDS_GEMV=0`` (A/B),
    with its packed fp16 products (cvt 3: fp16 rows on a GPU; ``tuned_config`` drops them for other rows). (2-warp
    packed tiles, the one-row step's fastest for fc1 and fc2, lost to the int8 matmul at two rows on the H100: run
    51.)
    16-bit weights (not ``int8``): the one-row 16-bit GEMV's tiles as tuned on the H100 (2-4 weight rows of 1024,
    fc2's of 512, summed after the K loop for fc1 and fc2; 16 for the output layer), in this kernel's columns; no
    words kernel (it reads int8)."""
    rows = 4 if swiglu else 8  # SwiGLU reads two row sets a program: half the columns keeps the tile's bytes
    if not int8:  # twice the bytes a weight: half the rows of the int8 tiles
        rows //= 2
        return [RowsGemvConfig(rows, 1024, cvt=0), RowsGemvConfig(rows // 2, 1024, cvt=0),
                RowsGemvConfig(rows // 2, 512, cvt=0), RowsGemvConfig(2 * rows, 512, cvt=0),
                RowsGemvConfig(4 * rows, 1024, cvt=0), RowsGemvConfig(rows // 2, 1024, cvt=0, kernel="gemv_acc"),
                RowsGemvConfig(rows // 2, 512, cvt=0, kernel="gemv_acc")]
    gemv = [RowsGemvConfig(rows, 1024), RowsGemvConfig(rows, 512), RowsGemvConfig(2 * rows, 512),
            RowsGemvConfig(rows // 2, 2048), RowsGemvConfig(rows, 1024, cvt=0)]
    words = [RowsGemvConfig(bn, bk, cvt=cvt, kernel="words") for bn, bk, cvt in
             ((4, 1024, 1), (2, 1024, 1), (8, 512, 1), (4, 2048, 1), (4, 1024, 0))]
    if os.environ.get("GLMCHAT_WORDS_GEMV", "1") == "0":
        return gemv
    if packed_products.tried():
        tiles = ((4, 1024), (2, 1024), (8, 1024), (4, 2048))
        words += [RowsGemvConfig(bn, bk, cvt=3, kernel="words") for bn, bk in tiles]
    return gemv + words


# the persistent kernel's tiles at two rows (row pairs a block, warps, programs an SM), within the register file at
# K 4096 (ptxas -v sm_90, Triton 3.6: int8 48-96 registers at 1-2 pairs and 8 warps, 80-167 at 4 warps; 16-bit
# 82-173); fc2's K 13696 needs 8 warps and one program an SM for int8 (153), and spills at 16 bits
PERSISTENT_ROWS_TILES = {"int8": ((1, 4, 4), (2, 4, 2), (1, 8, 2), (2, 8, 2), (1, 8, 1)),
                         "float": ((1, 4, 2), (1, 8, 2), (2, 8, 1), (1, 8, 1))}
# those also tried with blocks asked of L2 ahead (kernels/weight_prefetch.py), where no linear spills
PREFETCHING_ROWS_TILES = {"int8": ((1, 4, 4), (1, 8, 2)), "float": ((1, 8, 2),)}


def persistent_configs(int8: bool, m: int, dtype: torch.dtype) -> list[RowsGemvConfig]:
    """persistent_gemv's tiles for two rows (int8 weights against fp16 rows, or 16-bit weights), where offered; then,
    on a GPU, ``PREFETCHING_ROWS_TILES`` with blocks asked of L2 2 or 4 blocks ahead."""
    if m != 2 or not untested_persistent_tiles() or (int8 and dtype != torch.float16):
        return []
    kind = "int8" if int8 else "float"
    tiles = [RowsGemvConfig(bp, 0, w, kernel="persistent", programs_per_sm=p) for bp, w, p in PERSISTENT_ROWS_TILES[kind]]
    if weight_prefetch.tried():
        tiles += [RowsGemvConfig(bp, 0, w, kernel="persistent", programs_per_sm=p, l2_ahead=ahead)
                  for bp, w, p in PREFETCHING_ROWS_TILES[kind] for ahead in weight_prefetch.BLOCKS_AHEAD]
    return tiles


def takes(x: torch.Tensor, lw: Optional[LinearWeights]) -> bool:
    """Whether ``gemv_rows`` serves these rows: 2-4 of them against int8 or floating weights, with Triton at hand."""
    return (HAVE_TRITON and lw is not None and (lw.is_int8 or lw.weight.is_floating_point())
            and ROWS_MIN <= x.shape[0] <= ROWS_MAX)


_chosen: dict[tuple, Optional[RowsGemvConfig]] = {}  # the hot path is one dict lookup


def tuned_config(lw: LinearWeights, m: int, dtype: torch.dtype, device: torch.device, swiglu: bool,
                 norm: bool = False, other: Optional[Callable[[torch.Tensor], object]] = None,
                 timer=None, rope=None) -> Optional[RowsGemvConfig]:
    """The config for this weight at m rows on this GPU model: cached, else tuned now on scratch rows (their own
    generator, so the global RNG and seeded sampling are untouched); during a CUDA-graph capture, the default.
    ``other(x)``: the caller's other path for the same rows, timed among the candidates; None when it won (the
    caller takes it). ``norm``: the linear applies RMSNorm first (timed with it, as it runs). ``rope`` (a QKV
    linear's ``attention_batch.RopeWrite``): each candidate timed with the rotary and cache write as it runs them,
    in the words kernel's epilogue or as the rotary kernel after (scratch cache rows of the same shape)."""
    memo = (lw.weight.shape, lw.weight.dtype, m, dtype, swiglu, norm, other is not None, rope is not None, device)
    if memo in _chosen and timer is None:
        return _chosen[memo]
    n, k = lw.weight.shape
    weight = "" if lw.is_int8 else f"|w{str(lw.weight.dtype).split('.')[-1]}"  # (int8 keys as cards cached them)
    key = (f"gemv_rows|N{n}|K{k}|M{m}|{str(dtype).split('.')[-1]}{weight}{'|swiglu' if swiglu else ''}"
           f"{'|norm' if norm else ''}{'|vs_matmul' if other is not None else ''}{'|rope' if rope else ''}")
    scratch: dict = {}

    def run(cfg: RowsGemvConfig) -> Optional[torch.Tensor]:
        if not scratch:
            gen = torch.Generator(device=device).manual_seed(0)
            scratch["x"] = torch.randn(m, k, device=device, generator=gen).to(dtype)
            scratch["g"] = torch.ones(k, device=device, dtype=dtype) if norm else None
            scratch["out"] = torch.empty(m, n // 2 if swiglu else n, device=device, dtype=dtype)
            scratch["rope"] = scratch_rope(rope, m) if rope is not None else None
        if cfg.kernel == "other":  # (its RMSNorm is the layer's own, not the scratch one: its output is not compared)
            y = other(scratch["x"])
            if rope is not None:
                scratch["rope"].after(y)
            return None
        return _launch(scratch["x"], lw, scratch["out"], scratch["g"], None, 1e-5, swiglu, cfg, rope=scratch["rope"])

    candidates = (candidate_configs(swiglu, lw.is_int8) + persistent_configs(lw.is_int8, m, dtype)
                  + ([RowsGemvConfig(kernel="other")] if other is not None else []))
    if dtype != torch.float16:  # packed fp16 products (packed_products.int8_dot)
        candidates = [c for c in candidates if not (c.kernel == "words" and c.cvt == 3)]
    cfg: Optional[RowsGemvConfig] = tuning.pick(key, candidates, run, device, timer=timer)
    if cfg.kernel == "other":
        cfg = None
    if not tuning.capturing(device):
        _chosen[memo] = cfg
    return cfg


def scratch_rope(rope, m: int):
    """A ``RopeWrite`` like ``rope`` on scratch cache rows for m rows at a few positions (tuning writes there)."""
    shape = (m, rope.num_groups, 16, rope.head_dim)
    cache = rope.k_cache.new_zeros(shape)
    rows = torch.arange(m, device=cache.device)
    return replace(rope, k_cache=cache, v_cache=cache.clone(), positions=rows + 5, prefix_lens=rows)


def _launch(x, lw: LinearWeights, out, norm_weight, residual, eps, swiglu, cfg: RowsGemvConfig,
            qw: Optional[QuantizedWeight] = None, rope=None) -> torch.Tensor:
    """qw: the words kernel's view of lw (``gemv_4bit.int8_weight``), if the caller already made it. ``rope``: see
    ``gemv_rows``. Returns out, or with ``rope`` the rotated q."""
    m, k = x.shape
    n_out = out.shape[1]
    dummy = out
    bias = lw.bias
    if cfg.kernel == "persistent":
        if persistent_gemv.usable_rows(x, lw):
            persistent_gemv.launch_rows(x, lw, out, norm_weight, residual, eps, swiglu, cfg.block_n,
                                        cfg.programs_per_sm, cfg.num_warps, cfg.l2_ahead)
            return out if rope is None else rope.after(out)
        cfg = RowsGemvConfig()  # (tuned on aligned scratch rows; these are not)
    if cfg.kernel == "words":
        if not lw.is_int8:
            raise ValueError("the words kernel reads int8 weights; 16-bit ones take a gemv config")
        qw = qw or int8_weight(lw.weight, lw.scale)
        words = QuantLinearConfig("words", cfg.block_n, cfg.block_k, 2, cfg.num_warps, 1,
                                  cvt=3 if cfg.cvt == 3 else min(cfg.cvt, 1))
        quant_words.launch(x, qw, out, bias, None if swiglu else residual, norm_weight, eps, swiglu, words, False,
                           dummy, dummy, rope=rope)
        return out if rope is None else rope.q_view(out)
    _gemv_rows_kernel[(triton.cdiv(n_out, cfg.block_n),)](
        x, lw.weight, lw.scale if lw.is_int8 else dummy, bias if bias is not None else dummy,
        norm_weight if norm_weight is not None else dummy, residual if residual is not None else dummy, out,
        n_out, n_out if swiglu else 0, k, x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), eps,
        ROWS=m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, W_INT8=lw.is_int8, CVT=cfg.cvt if lw.is_int8 else 0,
        NORM=norm_weight is not None,
        HAS_BIAS=bias is not None, RESIDUAL=residual is not None and not swiglu, SWIGLU=swiglu,
        EVEN_K=k % cfg.block_k == 0, EVEN_N=n_out % cfg.block_n == 0,
        X_PASS=x_pass_width(k, cfg.block_k, cfg.num_warps), TILE_ACC=cfg.kernel == "gemv_acc",
        num_warps=cfg.num_warps, num_stages=1,
    )
    return out if rope is None else rope.after(out)


def gemv_rows(
    x: torch.Tensor,
    lw: LinearWeights,
    *,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    swiglu: bool = False,
    out: Optional[torch.Tensor] = None,
    config: Optional[RowsGemvConfig] = None,
    rope=None,
) -> torch.Tensor:
    """``out = epilogue(norm(x) @ W.T * scale + bias)`` for x [M, K], 2 <= M <= 4, int8 W [N, K] with its row scale
    or a floating W (no scale).

    ``norm_weight`` [K]: RMSNorm each row first (eps). ``swiglu``: W has 2F rows, out [M, F] =
    silu(y[:, :F]) * y[:, F:]; a ``residual`` is then added after it. Otherwise ``residual`` [M, N] is added in
    the kernel (it may be ``out`` itself). ``config``: the tiles (benchmarks), else tuned for this GPU model.
    ``rope`` (a QKV weight: an ``attention_batch.RopeWrite``): q and k rotated, q left in out's first H * D
    columns, k and v into each row's cache slot, in the words kernel's epilogue (else by the rotary kernel after);
    returns the rotated q [M, H, D]."""
    if rope is not None and (swiglu or residual is not None):
        raise ValueError("the rotary epilogue is for a QKV linear: no residual or SwiGLU")
    m, k = x.shape
    n = lw.weight.shape[0]
    if not takes(x, lw) or k != lw.weight.shape[1]:
        raise ValueError(f"gemv_rows takes {ROWS_MIN}-{ROWS_MAX} rows of {lw.weight.shape[1]} against int8 or floating "
                         f"weights, got {tuple(x.shape)}")
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs an even number of weight rows, got {n}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n // 2 if swiglu else n, device=x.device, dtype=x.dtype)
    cfg = (config or tuned_config(lw, m, x.dtype, x.device, swiglu, norm_weight is not None)
           or candidate_configs(swiglu, lw.is_int8)[0])
    qw = int8_weight(lw.weight, lw.scale) if cfg.kernel == "words" and lw.is_int8 else None
    if qw is not None and config is None and not quant_words.usable(x, qw, norm_weight, cvt=cfg.cvt):
        cfg = RowsGemvConfig()  # tuned on aligned scratch rows; these are not
    y = _launch(x, lw, out, norm_weight, residual, eps, swiglu, cfg, qw, rope=rope)
    if swiglu and residual is not None:
        out += residual
    return y
