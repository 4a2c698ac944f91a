"""RMSNorm and the language-model loss with lean backward passes: the same forward arithmetic as
the plain torch expressions, fewer tensors kept for the backward.

P-Tuning v2 backpropagates through every layer of a frozen base to reach the prefix, so what
autograd keeps for the backward is most of a step's memory above the weights. Written as plain
torch ops, RMSNorm keeps a float32 copy of its input and the normalised product (4.7 MB a norm
at 192 tokens of 4096), and ``cross_entropy(logits.float())`` keeps two float32 copies of the
logits (100 MB at 192 x 65024). These functions keep only the input (RMSNorm) and the 16-bit
logits with one log-sum-exp per row (the loss), and recompute the rest in the backward.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 22  # float32 logits rows handled at once by the loss: 16 MB


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (weight * (x * r)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        ct = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for a float64 model
        n = x.to(ct) * r  # the normalised input
        g = grad.to(ct) * weight.to(ct)
        grad_x = r * (g - n * (g * n).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.to(ct) * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``(weight * (x * rsqrt(mean(x^2) + eps))).to(x.dtype)``, the mean in float32."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(x.dtype)


def _chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights):
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        for rows in _chunks(*logits.shape):
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        picked = logits.gather(1, safe[:, None])[:, 0].float()
        losses = torch.where(valid, lse - picked, 0.0)
        if weights is None:  # the mean: nan when nothing is labelled, as torch's
            count = valid.sum()
            loss = losses.sum() / count
        else:
            count = None
            weights = torch.where(valid, weights.float(), 0.0)
            loss = (weights * losses).sum()
        ctx.save_for_backward(logits, safe, valid, lse, count, weights)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, safe, valid, lse, count, weights = ctx.saved_tensors
        if weights is None:
            scale = torch.where(valid, (grad / count).float(), 0.0)
        else:
            scale = grad.float() * weights
        out = torch.empty_like(logits)
        for rows in _chunks(*logits.shape):
            p = torch.exp(logits[rows].float() - lse[rows, None])  # softmax
            p.scatter_add_(1, safe[rows, None], torch.full_like(p[:, :1], -1.0))
            p.mul_(scale[rows, None])
            out[rows] = p.to(out.dtype)
        return out, None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor = None) -> torch.Tensor:
    """Mean cross-entropy of token t+1 given tokens up to t over labelled positions (labels != -100),
    computed in float32 as ``cross_entropy(logits.float()[:, :-1], labels[:, 1:])``. With ``row_weights``
    [b] it is instead the sum of each labelled token's cross-entropy times its row's weight (training
    uses 1 / (labelled tokens of the row's accumulation step), so micro-batches cut anywhere add up to
    the original per-step mean).

    logits [b, s, V] in any float dtype; labels [b, s]. Keeps only ``logits`` and a float32
    log-sum-exp per row for the backward, and works through the vocabulary a few rows at a time.
    """
    b, s, vocab = logits.shape
    labels = labels.to(logits.device)
    targets = torch.cat((labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)), dim=1)  # last position predicts nothing
    weights = None if row_weights is None else row_weights.to(logits.device, torch.float32)[:, None].expand(b, s).reshape(-1)
    return _CrossEntropy.apply(logits.reshape(b * s, vocab), targets.reshape(-1), weights)
