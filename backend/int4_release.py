"""The official THUDM/chatglm2-6b-int4 release, loaded without its remote code.

Its ``config.json`` says ``quantization_bit: 4``; every linear of the transformer layers is stored as
``weight`` int8 [out, in/2] holding two signed 4-bit values a byte (``q[2j] << 4 | q[2j+1] & 0xF``: the
even column in the high nibble), ``weight_scale`` fp16 [out] (the row's max |w| / 7, q = round(w / scale))
and its bias, as the release's ``quantization.py`` writes them. :class:`Int4Linear` keeps them packed
and multiplies through the weight widened a block at a time (the torch path: CPU, eager decoding, long
prompts and P-Tuning). Its backward computes only the input's gradient (the base is frozen) and widens
the weight again, so autograd keeps no widened copy: saving each linear's fp16 weight for the backward,
as ``F.linear`` on a dequantized copy does, holds ~11 GB for the 6B model, and a 6 GiB card could not
train on the release at all.
"""

from __future__ import annotations

import torch
from torch import nn

from .int8_linear import grad_input_in_blocks, linear_in_blocks

QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # per layer, as the release


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's rule: scale = max|w| / 7 per row, q = round(w / scale), two q a byte (even column high)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 7
    q = torch.round(w / scale.clamp_min(1e-12)[:, None]).to(torch.int16)  # [out, in] in [-7, 7]
    packed = ((q[:, 0::2] & 0xF) << 4) | (q[:, 1::2] & 0xF)  # [out, in/2] as 0..255
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8), scale.half()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in/2] -> the signed 4-bit values as int8 [out, in]."""
    b = packed.to(torch.int16)
    high = b >> 4  # arithmetic shift: the sign of the high nibble comes with it
    low = ((b & 0xF) ^ 8) - 8  # sign-extend the low nibble
    return torch.stack((high, low), dim=-1).flatten(-2).to(torch.int8)


def widen_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [n, k/2] packed (rows, or an even run of columns, of a weight) -> q * scale as [n, k] in ``dtype``,
    the product in float32 and rounded once (as the kernels and ``QuantizedWeight.dequantize`` do). The nibbles
    are split as int8, so no wider integer copy of the block is made."""
    n, half = packed.shape
    out = torch.empty(n, half, 2, device=packed.device, dtype=dtype)
    s = scale.float()[:, None]
    torch.mul(packed >> 4, s, out=out[..., 0])  # arithmetic shift: the high nibble keeps its sign
    torch.mul(((packed & 0xF) ^ 8) - 8, s, out=out[..., 1])  # the low nibble, sign-extended
    return out.view(n, 2 * half)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x [..., K] @ W.T + bias, W widened from ``packed`` a block of output rows at a time."""
    return linear_in_blocks(x, packed.shape[0], lambda rows: widen_int4(packed[rows], scale[rows], x.dtype), bias)


def packed_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dx [..., K] = grad_out [..., N] @ W, W widened a block of input columns at a time (blocks of an even
    number of columns: whole bytes of ``packed``)."""
    return grad_input_in_blocks(grad_out, packed.shape[1] * 2,
                                lambda cols: widen_int4(packed[:, cols.start // 2:cols.stop // 2], scale, grad_out.dtype))


class _PackedInt4Linear(torch.autograd.Function):
    """Saves the packed weight (the module's own buffer, no copy) and returns no gradient for it."""

    @staticmethod
    def forward(ctx, x, packed, scale, bias):
        ctx.save_for_backward(packed, scale)
        return packed_linear(x, packed, scale, bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, scale = ctx.saved_tensors
        return packed_grad_input(grad_out, packed, scale), None, None, None


class Int4Linear(nn.Module):
    """A linear whose weight stays packed 4-bit (the release's layout); frozen."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in ``dtype``."""
        return widen_int4(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _PackedInt4Linear.apply(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4 (packed)"


def is_int4_release(config) -> bool:
    return getattr(config, "quantization_bit", None) == 4


def replace_with_int4(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap the transformer layers' linears for empty Int4Linear modules (on the meta device), ready to load."""
    for layer in model.transformer.encoder.layers:
        for parent in (layer.self_attention, layer.mlp):
            for name in QUANTIZED_LINEARS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, Int4Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                                     dtype, device="meta"))
