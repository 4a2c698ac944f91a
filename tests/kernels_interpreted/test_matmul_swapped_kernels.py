"""The swapped int8 matmul (int8_matmul.matmul(swap=True), kernels/matmul_swapped.py: the weight as the tensor cores'
first operand) under
Triton's interpreter: for decode rows (a few, 16, 64 and a partial tile), K a multiple of the block or not, any
number of K splits, with and without bias, it gives the dequantised product, as the unswapped matmul does. Run
through tests/test_kernels_batch.py."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.int8_matmul import matmul  # noqa: E402
from backend.kernels.matmul_swapped import prefers_swapped  # noqa: E402


@pytest.mark.parametrize("m", [3, 16, 21])
@pytest.mark.parametrize("k,bias", [(256, False), (300, True)])
def test_swapped_tiles_give_the_dequantised_product(m, k, bias):
    torch.manual_seed(m + k)
    n = 80  # one full 64-row weight tile and a partial one
    q, scale = quantize_per_channel(torch.randn(n, k) * 0.02)
    lw = LinearWeights(q, scale, torch.randn(n) if bias else None)
    x = torch.randn(m, k)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + (lw.bias.double() if bias else 0)
    for split in (1, 2, 8):
        got = matmul(x, lw, (16, 64, 64, 4, 1, split), swap=True)
        assert got.shape == (m, n) and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), split
    # matmul_config's own tiles, with and without K splits
    for split_k in (True, False):
        assert torch.allclose(matmul(x, lw, split_k=split_k, swap=True).double(), want, rtol=1e-4, atol=1e-5)


def test_off_the_gpu_the_unswapped_kernel_runs():
    """No card to time them on: the choice stays the unswapped kernel (what the H200 figures measured)."""
    q, scale = quantize_per_channel(torch.randn(64, 128))
    assert not prefers_swapped(torch.randn(8, 128), LinearWeights(q, scale), split_k=True)
