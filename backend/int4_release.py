"""The official THUDM/chatglm2-6b-int4 release, loaded without its remote code.

Its ``config.json`` says ``quantization_bit: 4``; every linear of the transformer layers is stored as
``weight`` int8 [out, in/2] holding two signed 4-bit values a byte (``q[2j] << 4 | q[2j+1] & 0xF``: the
even column in the high nibble), ``weight_scale`` fp16 [out] (the row's max |w| / 7, q = round(w / scale))
and its bias, as the release's ``quantization.py`` writes them. :class:`Int4Linear` keeps them packed
and multiplies through a dequantized copy made per call (the torch path: CPU, eager decoding, and the
P-Tuning backward, which needs only the input's gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        return unpack_int4(self.weight).to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

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
