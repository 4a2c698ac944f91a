"""Weight-only int8 linears for P-Tuning over an 8-bit base, forward and backward.

bitsandbytes' LLM.int8 quantises the activations too and splits out outlier columns on every
call, which makes a P-Tuning step slow (the original stack: ~175 ms at 192 tokens on an H100).
The base is frozen, so only the input gradient is needed: ``dx = dy @ W``. These layers keep the
int8 rows and per-row scales bitsandbytes already holds (shared storage, no fp16 copy kept),
multiply through the Triton int8 matmul of ``int8_linear`` (torch on the CPU), and widen a few
thousand weight rows at a time for the backward matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from .int8_linear import LinearWeights, is_quantized_module, linear, linear_weights


_ROWS = 4096  # widen at most this many weight rows at a time: a bounded temporary in the backward


class _WeightOnlyInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return linear(x, LinearWeights(weight, scale, bias))

    @staticmethod
    def backward(ctx, grad_out):
        """dx = dy @ (q * scale), one block of rows widened at a time (int8 * fp16 is one kernel)."""
        weight, scale = ctx.saved_tensors
        scale = scale.to(grad_out.dtype)
        grad_in = None
        for start in range(0, weight.shape[0], _ROWS):
            rows = slice(start, start + _ROWS)
            part = grad_out[..., rows] @ (weight[rows] * scale[rows, None])
            grad_in = part if grad_in is None else grad_in.add_(part)
        return grad_in, None, None, None


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
