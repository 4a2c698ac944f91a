"""The 8-bit model's linears: weight-only int8 with a scale per output row, forward and backward.

This is ChatGLM2's own 8-bit scheme (the original ``quantize(8)``, which ptuning's ``--quantization_bit 8``
runs): ``loading`` quantizes each checkpoint weight into an ``Int8Linear`` as it reads it. Only the weights are
int8; the activations keep the compute dtype. bitsandbytes is not used for 8-bit: its LLM.int8 matmul also
quantises the activations and splits out outlier columns on every call (a P-Tuning step took ~175 ms at 192
tokens on an H100 that way), and importing it costs seconds (it compiles its ops with ``torch.compile``) for
what is here a few lines of quantization. Models loaded through transformers' ``BitsAndBytesConfig`` keep
their ``Linear8bitLt`` layers; ``use_weight_only_int8`` swaps them for ``Int8Linear`` over the same int8 storage
before training.

The base is frozen, so only the input gradient is needed: ``dx = dy @ W``. Both directions multiply through
Triton kernels that widen the int8 weights in registers: ``kernels.int8_matmul``'s matmul forward,
``_grad_input_kernel`` here backward; from ``int8_linear.WIDEN_MIN_ROWS`` tokens (compute-bound) both go
through cuBLAS on the weight widened a block at a time. On the CPU both are torch math (the backward widens a
few thousand weight rows at a time).
"""

from __future__ import annotations

import torch
from torch import nn

from . import int8_linear
from .int8_linear import (
    HAVE_TRITON, LinearWeights, is_quantized_module, linear, linear_weights, quantize_per_channel, widened_grad_input,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

_ROWS = 4096  # the CPU backward widens at most this many weight rows at a time


if HAVE_TRITON:

    @triton.jit
    def _grad_input_kernel(
        g_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_gm, stride_os, stride_om,
        N_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # out[split, M, K] = g[M, n_range] @ (w[n_range, K] * scale[n_range, None]), n_range the split's rows
        # of w; the scale goes on the widened weight tile (values of the weights' size), the sum is float32.
        num_m = tl.cdiv(M, BLOCK_M)
        pid = tl.program_id(0)
        pid_m = pid % num_m  # programs reading the same weight columns run side by side: L2 serves the rest
        pid_k = pid // num_m
        split = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.arange(0, BLOCK_N)
        mm = rm < M
        mk = rk < K
        n_start = split * N_PER_SPLIT  # a multiple of BLOCK_N (a constant: a few values per model)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n0 in range(0, N_PER_SPLIT, BLOCK_N):
            n = n_start + n0 + rn
            mn = n < N
            a = tl.load(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + n[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
            w = tl.load(w_ptr + n.to(tl.int64)[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0)
            s = tl.load(scale_ptr + n, mask=mn, other=0.0)
            acc = tl.dot(a, (w.to(tl.float32) * s[:, None]).to(a.dtype), acc)
        out = out_ptr + split.to(tl.int64) * stride_os + rm.to(tl.int64)[:, None] * stride_om + rk[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mk[None, :])


def grad_input_triton(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dx [M, K] = grad_out [M, N] @ (weight [N, K] int8 * scale [N, None]) through one Triton kernel.

    Small outputs split the sum over N across programs (float32 partials, summed after) so that
    every SM has work; no widened copy of the weight is ever written.
    """
    M, N = grad_out.shape
    K = weight.shape[1]
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    bm, bn, bk = (64, 64, 128) if M <= 64 else (128, 64, 128)
    warps = 4 if bm == 64 else 8
    tiles = triton.cdiv(M, bm) * triton.cdiv(K, bk)
    sms = torch.cuda.get_device_properties(grad_out.device).multi_processor_count if grad_out.is_cuda else 132
    split = 1
    while tiles * split < 2 * sms and N // (bn * split * 2) >= 8:  # each split keeps >= 8 steps of BLOCK_N
        split *= 2
    n_per_split = triton.cdiv(triton.cdiv(N, split), bn) * bn
    split = triton.cdiv(N, n_per_split)
    if split == 1:
        out = torch.empty(M, K, device=grad_out.device, dtype=grad_out.dtype)
        stride_os = 0
    else:
        out = torch.empty(split, M, K, device=grad_out.device, dtype=torch.float32)
        stride_os = out.stride(0)
    _grad_input_kernel[(tiles, split)](
        grad_out, weight, scale, out, M, N, K, grad_out.stride(0), stride_os, out.stride(-2),
        N_PER_SPLIT=n_per_split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=3,
    )
    return out if split == 1 else out.sum(0).to(grad_out.dtype)


def grad_input_torch(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same in torch, one block of weight rows widened at a time (int8 * scale is one kernel)."""
    scale = scale.to(grad_out.dtype)
    grad_in = None
    for start in range(0, weight.shape[0], _ROWS):
        rows = slice(start, start + _ROWS)
        part = grad_out[..., rows] @ (weight[rows] * scale[rows, None])
        grad_in = part if grad_in is None else grad_in.add_(part)
    return grad_in


class _WeightOnlyInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return linear(x, LinearWeights(weight, scale, bias))

    @staticmethod
    def backward(ctx, grad_out):
        """dx = dy @ (q * scale)."""
        weight, scale = ctx.saved_tensors
        if HAVE_TRITON and grad_out.is_cuda and grad_out.dtype in (torch.float16, torch.bfloat16):
            shape = grad_out.shape
            flat = grad_out.reshape(-1, shape[-1])
            wide = flat.shape[0] >= int8_linear.WIDEN_MIN_ROWS  # compute-bound: cuBLAS on the widened weight
            grad_in = (widened_grad_input if wide else grad_input_triton)(flat, weight, scale).view(*shape[:-1], -1)
        else:
            grad_in = grad_input_torch(grad_out, weight, scale)
        return grad_in, None, None, None


class Int8Linear(nn.Module):
    """``y = x @ (weight * scale)^T + bias`` with ``weight`` int8 [N, K] and ``scale`` float32 [N]; frozen.

    ``weight`` and ``bias`` carry the checkpoint's names, so the loader's checks of names and shapes hold as
    for ``nn.Linear``; ``scale`` is derived from the weight, not stored in checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weights(cls, weights: LinearWeights) -> "Int8Linear":
        """A layer over ``weights``' int8 rows and scales as they are (shared, not copied)."""
        out_features, in_features = weights.weight.shape
        bias = weights.bias
        layer = cls(in_features, out_features, bias is not None, bias.dtype if bias is not None else torch.float16, "meta")
        layer.weight, layer.scale = weights.weight, weights.scale.float()
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def quantize_from(self, weight: torch.Tensor) -> None:
        """Set the int8 rows and scales from a float weight [N, K] (on the device the layer is to live on)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.in_features} -> {self.out_features} layer")
        self.weight, self.scale = quantize_per_channel(weight)

    def linear_weights(self) -> LinearWeights:
        return LinearWeights(self.weight, self.scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _WeightOnlyInt8.apply(x, self.weight, self.scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8 (a scale per row)"


def use_weight_only_int8(model: nn.Module) -> int:
    """Swap every bitsandbytes 8-bit linear of ``model`` (a model loaded through transformers' ``BitsAndBytesConfig``)
    for an Int8Linear over the same int8 storage.

    Returns how many were swapped (0 when there are none: a 16-bit or 4-bit base, an 8-bit one ``loading`` built,
    or a second call).
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if is_quantized_module(child) == "int8" and not isinstance(child, Int8Linear):
                dtype = child.bias.dtype if child.bias is not None else torch.float16
                setattr(module, child_name, Int8Linear.from_weights(linear_weights(child, "int8", dtype)))
                swapped += 1
    return swapped
