"""Weight-only int8 linears: per-channel quantisation, the weights as the kernels read them, and the plumbing
that routes a linear to a kernel, cuBLAS or torch.

A linear's weight is kept as ``LinearWeights``: the weight [N, K] (int8 with a float32 scale per
output row, or bf16/fp16/fp32 with no scale) and an optional bias. bitsandbytes ``Linear8bitLt``
layers already hold exactly this (``weight.CB`` int8 rows, ``weight.SCB`` absmax per row), so
their storage is shared, never copied or widened to fp16.

The arithmetic on CUDA is in ``backend/kernels``: ``int8_gemv.gemv`` for one token (the decode step, with
its fused prologue and epilogues) and ``int8_matmul.matmul`` for several rows (a batch's step, short
prompts). From ``WIDEN_MIN_ROWS`` rows up (long prompts, training micro-batches) the product is
compute-bound and cuBLAS beats the Triton tiles, so ``widened_linear`` widens the weight a block of
rows at a time (``kernels.widen_int8``: ``(q * scale)`` in the activation dtype, at most
``widen_chunk_bytes`` alive) for ``F.linear``. Without CUDA (or Triton) ``linear_torch`` does the
same math in torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels.decode_kernels import swiglu_rows
from .kernels.int8_matmul import matmul
from .kernels.widen_int8 import HAVE_TRITON, widen_int8


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
    return linear_in_blocks(x, lw.weight.shape[0], lambda rows: widen_int8(lw.weight[rows], lw.scale[rows], x.dtype),
                            lw.bias, residual, out)


def widened_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dx [M, K] = grad_out [M, N] @ (q * scale) through cuBLAS, the weight widened a block of input columns at
    a time."""
    return grad_input_in_blocks(grad_out, weight.shape[1], lambda cols: widen_int8(weight[:, cols], scale, grad_out.dtype))


def linear_rows(x: torch.Tensor, lw: LinearWeights, *, split_k: bool = True, residual: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None, swiglu: bool = False) -> torch.Tensor:
    """x [M, K] (M > 1, CUDA) through int8 (or 16-bit) weights: up to ``WIDEN_MIN_ROWS`` int8 rows the Triton
    matmul (``kernels.int8_matmul.matmul``, its arguments), from there cuBLAS on the weight widened a block at a
    time (compute-bound)."""
    if not (lw.is_int8 and x.shape[0] >= WIDEN_MIN_ROWS):
        return matmul(x, lw, split_k=split_k, residual=residual, out=out, swiglu=swiglu)
    if not swiglu:
        return widened_linear(x, lw, residual, out)
    return add_into(swiglu_rows(widened_linear(x, lw)), residual, out)


def linear(x: torch.Tensor, lw: LinearWeights) -> torch.Tensor:
    """x [..., K] -> [..., N]: int8 weights through the Triton matmul or cuBLAS on CUDA, else torch."""
    if lw.is_int8 and HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        shape = x.shape
        return linear_rows(x.reshape(-1, shape[-1]), lw).view(*shape[:-1], -1)
    return linear_torch(x, lw)

