"""One linear of the batched fast decoder, read as it is stored: NF4 and the int4 release packed through
``backend.kernels.gemv_4bit.quant_linear`` (RMSNorm, SwiGLU and the residual folded in) up to 64 rows; one
row through the one-row decoder's GEMV; 2-4 int8 or 16-bit rows through ``kernels.gemv_rows`` (that GEMV reading
each weight tile once for all of them) where it ran faster than the other path on this card; more int8 rows
through ``int8_matmul.matmul`` (its tensor-core tiles widen the int8 weight in registers; on the H200 they read it
1.5-4x faster than quant_linear's int8 tiles from 4 to 64 rows, bench/NOTES.md run 9) with RMSNorm as a launch of
its own and the residual, and up to 16 rows SwiGLU, in its epilogue (bench/NOTES.md runs 25-27); more 16-bit rows
through cuBLAS; long prompts through tensor cores on the weight widened a block at a time, cuBLAS adding into the
residual stream. From 16 4-bit rows, whichever of quant_linear and the widened weight for cuBLAS
(``kernels.widen_4bit``) ran faster on this card (timed on first use, like a kernel's tiles)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..int8_linear import LinearWeights, add_into, is_quantized_module, linear_in_blocks, linear_rows, linear_weights
from ..kernels.int8_gemv import default_gemv_config, gemv
from ..kernels import gemv_rows, tuning
from ..kernels.decode_kernels import rms_norm_rows, swiglu_rows
from ..kernels.gemv_4bit import (QuantizedWeight, int4_release_weight, int8_weight, kernels_run, m_bucket,
                                 params4bit_weight, quant_linear)
from ..kernels.widen_4bit import widen_rows
from ..lean_autograd import rms_norm

QUANT_MAX_M = 64  # 4-bit rows up to this go through quant_linear; more widen each weight for one tensor-core matmul
# Up to this many rows, int8 and 16-bit linears run the one-row decoder's GEMV once a row: one row is 2.5 ms a
# step that way on the H200; from two rows the weight must be read once for all of them (a compare's two rows:
# 400 tok/s together through the int8 matmul's tiles against 216 through the GEMV twice, bench/NOTES.md run 9)
ONE_ROW_GEMV_MAX_M = 1
# From this many 4-bit rows (quant_linear's tensor-core tiles) the widened weight through cuBLAS is timed against
# them: those tiles decode every weight inside the matmul, which can cost more than writing and reading a 16-bit
# block (on the H100 NF4's 64-token prompt took 48.9 ms through them, its 1600-token one 53.7 ms widened:
# bench/NOTES.md runs 21-22)
WIDEN_4BIT_MIN_M = 16
# Up to this many int8 rows (a decode step's buckets: compare's two, a server's 64) fc1's SwiGLU is made in the
# int8 matmul's epilogue: compare went from 1.79x to 1.82x one reply on the H100 (bench/NOTES.md run 27), and 64
# replies from 8,620-10,380 to 9,380-11,180 tok/s (run 31, one machine, alternating). Evaluation's 128-256 rows
# keep the separate launch: 1070 examples in 12.2 s that way, 13.7-14.2 s with it (run 32)
SWIGLU_IN_MATMUL_M = 64


def quantized_weight(module) -> Optional[QuantizedWeight]:
    """The packed weight of a quantized linear layer, shared as stored; None for a float layer.

    bitsandbytes ``Linear4bit`` (NF4) -> "nf4"; bitsandbytes ``Linear8bitLt`` and ``int8_layer.Int8Linear``
    -> "int8" (through ``int8_linear.linear_weights``, which shares their rows); a layer with an int8
    ``weight`` and a ``weight_scale`` (the chatglm2-6b-int4 release's QuantizedLinear) -> "int4" when the
    weight holds half the input columns (``in_features`` or ``weight_bit_width`` say which), else "int8"
    (the int8 release's layout). The bias stays the layer's own."""
    scale = getattr(module, "weight_scale", None)
    weight = getattr(module, "weight", None)
    if scale is not None and weight is not None and weight.dtype == torch.int8:  # the int4 / int8 releases
        in_features = getattr(module, "in_features", None)
        bits = getattr(module, "weight_bit_width", None)
        if bits == 8 or (bits is None and in_features == weight.shape[1]):
            return int8_weight(weight, scale)
        if in_features is not None and in_features != 2 * weight.shape[1]:
            raise ValueError(f"int4 weight {tuple(weight.shape)} does not hold {in_features} input columns")
        return int4_release_weight(weight, scale)
    kind = is_quantized_module(module)
    if kind == "4bit":
        return params4bit_weight(module.weight)
    if kind == "int8":
        lw = linear_weights(module, "int8", torch.float32)
        return int8_weight(lw.weight, lw.scale)
    return None


def _rotated(qkv: torch.Tensor, rope) -> torch.Tensor:
    """qkv as it is, or (``rope``) the rotary kernel run after it: the rotated q."""
    return qkv if rope is None else rope.after(qkv)


def widened_4bit_linear(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                        residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ W.T + bias (+ residual, into out) through cuBLAS, W widened to x's dtype a block of output
    rows at a time (``int8_linear.linear_in_blocks``, ``kernels.widen_4bit.widen_rows``)."""
    return linear_in_blocks(x, w.n, lambda rows: widen_rows(w, rows, x.dtype, like=x), bias, residual, out)


@dataclass
class FourBitRows:
    """How a 4-bit linear takes a bucket of rows: quant_linear's kernels, or the weight widened for cuBLAS."""

    path: str = "kernel"  # "kernel" | "widened"


class BatchLinear:
    """One linear as stored: a packed weight for ``quant_linear`` or a 16-bit one for cuBLAS."""

    def __init__(self, module, dtype: torch.dtype, kind: str):
        self.module = module
        self.kind = kind  # "qkv" | "dense" | "fc1" | "fc2" | "output": the one-row GEMV's tuned config
        self.q: Optional[QuantizedWeight] = quantized_weight(module)
        self.w = None if self.q is not None else module.weight.detach().to(dtype)
        bias = getattr(module, "bias", None)
        self.bias = bias.detach().to(dtype) if bias is not None else None
        # int8 or 16-bit weights as int8_linear reads them: its one-row GEMV, and its matmul for long prompts
        self.one_row: Optional[LinearWeights] = None
        if self.q is None:
            self.one_row = LinearWeights(self.w, None, self.bias)
        elif self.q.fmt == "int8":
            self.one_row = LinearWeights(self.q.data, self.q.scale, self.bias)
        # 2-4 int8 or 16-bit rows through gemv_rows (each weight tile read once for all of them); 0: the matmul or
        # cuBLAS, for an A/B
        self.rows_gemv = os.environ.get("GLMCHAT_ROWS_GEMV", "1") != "0"
        # one row's tiles, tuned inside the one-row step (decode/one_row_tuning.py): the one-row GEMV's for int8 and
        # 16-bit weights; for 4-bit ones quant_linear's config (None: the one its own tuner picked for one row)
        self.row_config = default_gemv_config(kind, self.q is not None) if self.one_row is not None else None
        self._paths: dict = {}  # (row bucket, dtype, device, swiglu) -> FourBitRows.path, once tuned

    def __call__(self, x, *, norm=None, eps=1e-5, swiglu=False, residual=None, out=None, split_k=True, pdl=False,
                 rope=None):
        """``split_k``: whether the int8 matmul may split K (a second launch: for a decode step's CUDA graph, not for
        a prompt, whose launches are paid on the host); ``pdl``: 4-bit rows through ``quant_linear`` launch as
        programmatic dependents (one row's step, ``one_row_step``). ``rope`` (the QKV linear of a decode step: an
        ``attention_batch.RopeWrite``): q and k rotated, k and v into the rows' cache slots, in the words kernel's
        epilogue where the rows take it (``quant_linear``, ``gemv_rows``), else by the rotary kernel after; then
        the rotated q [rows, H, D] is returned."""
        if x.shape[0] <= ONE_ROW_GEMV_MAX_M and self.one_row is not None and kernels_run(x):
            return _rotated(self._one_row(x, norm, eps, swiglu, residual, out), rope)
        if self.rows_gemv and gemv_rows.takes(x, self.one_row) and kernels_run(x):
            # the few-rows GEMV unless this card ran the matmul path faster for these rows (timed on first use)
            config = gemv_rows.tuned_config(self.one_row, x.shape[0], x.dtype, x.device, swiglu, norm is not None,
                                            other=lambda xs: self._matmul_path(xs, norm, eps, swiglu, None, None, split_k),
                                            rope=rope)
            if config is not None:
                return gemv_rows.gemv_rows(x, self.one_row, norm_weight=norm, eps=eps, swiglu=swiglu,
                                           residual=residual, out=out, config=config, rope=rope)
        if self.q is not None and self.q.fmt != "int8" and x.shape[0] <= QUANT_MAX_M and not self._widen_4bit(x, swiglu):
            return quant_linear(x, self.q, self.bias, residual=residual, norm_weight=norm, eps=eps, swiglu=swiglu,
                                out=out, pdl=pdl, config=self.row_config if x.shape[0] == 1 else None, rope=rope)
        return _rotated(self._matmul_path(x, norm, eps, swiglu, residual, out, split_k), rope)

    def _widen_4bit(self, x: torch.Tensor, swiglu: bool) -> bool:
        """Whether these 4-bit rows go through the widened weight: from WIDEN_4BIT_MIN_M rows, where it ran faster
        than quant_linear on this card for the rows' bucket (tuned on first use outside a graph capture and cached
        per GPU model; during a capture, and before tuning, quant_linear). GLMCHAT_4BIT_ROWS=kernel|widened fixes
        the path (benchmarks' A/B)."""
        m = x.shape[0]
        if m < WIDEN_4BIT_MIN_M or not kernels_run(x):
            return False
        forced = os.environ.get("GLMCHAT_4BIT_ROWS")
        if forced in ("kernel", "widened"):
            return forced == "widened"
        memo = (m_bucket(m), x.dtype, x.device, swiglu)
        if memo not in self._paths:
            path = self._tuned_4bit_path(memo[0], x.dtype, x.device, swiglu)
            if tuning.capturing(x.device):
                return path.path == "widened"
            self._paths[memo] = path.path
        return self._paths[memo] == "widened"

    def _tuned_4bit_path(self, bucket: int, dtype: torch.dtype, device: torch.device, swiglu: bool) -> FourBitRows:
        """Both paths timed as the layer runs them (SwiGLU fused, or a launch of its own after cuBLAS), so the
        kernel path reads quant_linear's tiles tuned for the decoder's own calls."""
        q = self.q
        key = (f"4bit_rows|{q.fmt}{'n' if q.nested else ''}|N{q.n}|K{q.k}|M{bucket}|{str(dtype).split('.')[-1]}"
               f"{'|swiglu' if swiglu else ''}")
        scratch: dict = {}

        def run(choice: FourBitRows) -> torch.Tensor:
            if not scratch:  # its own generator: tuning leaves the global RNG (seeded sampling) alone
                gen = torch.Generator(device=device).manual_seed(0)
                scratch["x"] = torch.randn(bucket, q.k, device=device, generator=gen).to(dtype)
            if choice.path == "widened":
                y = widened_4bit_linear(scratch["x"], q, self.bias)
                return swiglu_rows(y) if swiglu else y
            return quant_linear(scratch["x"], q, self.bias, swiglu=swiglu)

        return tuning.pick(key, [FourBitRows("kernel"), FourBitRows("widened")], run, device)

    def _matmul_path(self, x, norm, eps, swiglu, residual, out, split_k):
        """RMSNorm, the wide matmul and SwiGLU as launches of their own (many rows, or no kernels); the residual
        inside the product's launches where it follows it directly (``_wide``), and at up to SWIGLU_IN_MATMUL_M
        int8 rows SwiGLU too: a launch a layer fewer and no [rows, 2F] product."""
        fused = kernels_run(x)
        if norm is not None:
            x = rms_norm_rows(x, norm, eps) if fused else rms_norm(x, norm, eps)
        if not swiglu:
            return self._wide(x, split_k, residual, out)
        if self._int8_matmul(x) and x.shape[0] <= SWIGLU_IN_MATMUL_M:
            return linear_rows(x, self.one_row, split_k=split_k, swiglu=True, residual=residual, out=out)
        y = self._wide(x, split_k)
        if fused:
            y = swiglu_rows(y)
        else:
            a, b = y.chunk(2, dim=-1)
            y = F.silu(a) * b
        return add_into(y, residual, out)

    def _int8_matmul(self, x: torch.Tensor) -> bool:
        """Whether many rows go through ``int8_linear.linear_rows`` (int8 weights on CUDA)."""
        return self.q is not None and self.q.fmt == "int8" and x.is_cuda

    def _one_row(self, x, norm, eps, swiglu, residual, out):
        """Each activation row (up to ONE_ROW_GEMV_MAX_M) through the one-row decoder's GEMV (int8_gemv.gemv)
        and its tuned tiles: a tensor-core tile computes 16 rows to use one (bench/NOTES.md, run 8)."""
        n = self.one_row.weight.shape[0] // (2 if swiglu else 1)
        y = out if out is not None else torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
        for i in range(x.shape[0]):
            res = None if residual is None or swiglu else residual[i]  # (the GEMV's SwiGLU epilogue adds none)
            self.gemv_row(x[i].contiguous(), y[i], norm=norm, eps=eps, swiglu=swiglu, residual=res)
        if swiglu and residual is not None:
            y += residual
        return y

    def gemv_row(self, x, out, *, norm=None, eps=1e-5, swiglu=False, residual=None, rope=None, argmax=None,
                 pdl=False):
        """One activation row x [K] into out through the one-row GEMV (int8 or 16-bit weights) with its epilogues:
        ``int8_gemv.gemv``'s rotary + cache write (``rope``), folded greedy pick (``argmax``) and ``pdl``."""
        return gemv(x, self.one_row, out, norm_weight=norm, eps=eps, swiglu=swiglu, residual=residual, rope=rope,
                    argmax=argmax, pdl=pdl, config=self.row_config)

    def _wide(self, x: torch.Tensor, split_k: bool = True, residual=None, out=None) -> torch.Tensor:
        """x @ W.T + b (+ residual, into out) for many rows: tensor cores on the weight (int8 widened in registers,
        the residual added in the matmul's epilogue; or a block at a time for cuBLAS from WIDEN_MIN_ROWS, and
        4-bit a block at a time, cuBLAS adding into the residual when it is ``out``)."""
        if self.q is None:
            y = F.linear(x, self.w, self.bias)
        elif self._int8_matmul(x):
            return linear_rows(x, self.one_row, split_k=split_k, residual=residual, out=out)
        elif self.q.fmt in ("nf4", "int4"):
            return widened_4bit_linear(x, self.q, self.bias, residual, out)
        else:
            y = F.linear(x, self.q.dequantize(x.dtype), self.bias)
        return add_into(y, residual, out)
