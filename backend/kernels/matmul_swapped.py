"""When the int8 matmul runs with its operands swapped (``int8_matmul.matmul(swap=True)``, the kernel's
``SWAP_AB``): ``C.T = W @ X.T``, the weight as the tensor cores' first operand.

Why: ``int8_matmul.matmul`` computes ``X @ W.T``, the widened weight as the second operand. On Hopper, wgmma
reads its second operand only from shared memory, so every int8 tile goes global -> shared -> registers (widened)
-> shared again -> wgmma (PTX of the sm_90 build: 12 shared stores in the loop), and at 5-64 rows the linears ran
at 0.9-1.6 TB/s on the H200 (bench/NOTES.md run 11), a fifth to a third of what the weight bytes allow; at
128-256 rows (evaluation) the same shared-memory round trip sits in a compute-bound loop. wgmma's first operand
may come from registers: with the weight there, it is widened in registers and fed straight in (no shared store
of it), and the activation rows become wgmma's N (16-64: ``m64n16k16`` at 16 rows, no rows computed for nothing
beyond the 16). Machete (vLLM's mixed-input GEMM for Hopper) swaps its operands for the same reason; Triton
emits this form for it (the compile test checks the PTX).

Whether it beats the unswapped kernel on a card is decided there: ``prefers_swapped`` times both on first use per
GPU model, shape and row bucket (``tuning.pick``, cached on disk), so no card is handed a blind default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import tuning
from .int8_matmul import HAVE_TRITON, MATMUL_MID_ROWS, matmul

if TYPE_CHECKING:
    from ..int8_linear import LinearWeights

if HAVE_TRITON:
    import triton


@dataclass(frozen=True)
class MatmulForm:
    swapped: bool = False  # the default (first candidate) is the unswapped kernel: what the H200 figures measured


# GLMCHAT_MATMUL_SWAP=0: never the swapped form (the A/B against it in one call)
SWAP_ALLOWED = os.environ.get("GLMCHAT_MATMUL_SWAP", "1") != "0"
_chosen: dict[tuple, bool] = {}  # (N, K, row bucket, dtype, split_k, device) -> swapped: the hot path is one lookup


def prefers_swapped(x: torch.Tensor, lw: LinearWeights, split_k: bool, timer=None) -> bool:
    """Whether this card runs the swapped matmul faster for these rows of this int8 weight: decided on first use
    (outside CUDA-graph capture) by timing both on scratch rows of the row bucket, cached on disk per GPU model.
    Only the Triton tiles' rows (decode steps, evaluation's 128 and 256 rows, short prompts: up to
    MATMUL_MID_ROWS) on CUDA are considered; elsewhere the unswapped kernel runs."""
    M, K = x.shape
    if not (HAVE_TRITON and lw.is_int8 and x.is_cuda and 1 < M <= MATMUL_MID_ROWS) or not SWAP_ALLOWED:
        return False
    N = lw.weight.shape[0]
    bucket = max(16, triton.next_power_of_2(M))
    memo = (N, K, bucket, x.dtype, split_k, x.device)
    if memo in _chosen and timer is None:
        return _chosen[memo]
    key = f"int8_matmul_form|N{N}|K{K}|M{bucket}|{str(x.dtype).split('.')[-1]}|{'split' if split_k else 'one'}"
    scratch = torch.randn(bucket, K, device=x.device, generator=torch.Generator(device=x.device).manual_seed(0))
    scratch = scratch.to(x.dtype)

    def run(form: MatmulForm) -> torch.Tensor:
        return matmul(scratch, lw, split_k=split_k, swap=form.swapped)

    form = tuning.pick(key, [MatmulForm(False), MatmulForm(True)], run, x.device, timer=timer)
    if not tuning.capturing(x.device):
        _chosen[memo] = form.swapped
    return form.swapped
