"""Weight-only int8 linears for P-Tuning over an 8-bit base, forward and backward.

bitsandbytes' LLM.int8 quantises the activations too and splits out outlier columns on every
call, which makes a P-Tuning step slow (the original stack: ~175 ms at 192 tokens on an H100).
The base is frozen, so only the input gradient is needed: ``dx = dy @ W``. These layers keep the
int8 rows and per-row scales bitsandbytes already holds (shared storage, no fp16 copy kept),
widen one layer's weight at a time for cuBLAS (forward of a batch, and the backward matmul), and
use the int8 kernels of ``int8_linear`` for a few rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8_linear import LinearWeights, is_quantized_module, linear, linear_weights


def _widen(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype) * scale.to(dtype)[:, None]  # [N, K], one layer at a time


class _WeightOnlyInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        if x.numel() // x.shape[-1] > 64:  # a training batch: widening once and cuBLAS beats the int8 kernel
            return F.linear(x, _widen(weight, scale, x.dtype), bias)
        return linear(x, LinearWeights(weight, scale, bias))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        return grad_out @ _widen(weight, scale, grad_out.dtype), None, None, None


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T + bias`` with q int8 [N, K] and scale [N]; frozen."""

    def __init__(self, weights: LinearWeights):
        super().__init__()
        self.out_features, self.in_features = weights.weight.shape
        self.register_buffer("qweight", weights.weight, persistent=False)
        self.register_buffer("scale", weights.scale.float(), persistent=False)
        self.register_buffer("bias", weights.bias, persistent=False)

    def linear_weights(self) -> LinearWeights:
        return LinearWeights(self.qweight, self.scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _WeightOnlyInt8.apply(x, self.qweight, self.scale, bias)


def use_weight_only_int8(model: nn.Module) -> int:
    """Swap every bitsandbytes 8-bit linear of ``model`` for an Int8Linear over the same int8 storage.

    Returns how many were swapped (0 when there are none, e.g. a 16-bit or 4-bit base, or a second call).
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_quantized_module(child) == "int8" and not isinstance(child, Int8Linear):
                dtype = child.bias.dtype if child.bias is not None else torch.float16
                setattr(module, child_name, Int8Linear(linear_weights(child, "int8", dtype)))
                swapped += 1
    return swapped
