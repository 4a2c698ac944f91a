"""The int8 matmul's split-K path (backend/kernels/int8_matmul.py: _matmul_kernel with SPLIT_K, its partials added by
each tile's last program or by _split_sum_kernel) under Triton's interpreter: any number of K splits (one longer
than the weight's K blocks included) gives the dequantised product, with bias, for K a multiple of the block or
not. Run through tests/test_kernels_batch.py."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
triton = pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.int8_matmul import matmul  # noqa: E402


@pytest.mark.parametrize("K", [256, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_k_splits_give_the_dequantised_product(K, bias):
    torch.manual_seed(K)
    N, M = 40, 3
    q, scale = quantize_per_channel(torch.randn(N, K) * 0.02)
    b = torch.randn(N) if bias else None
    lw = LinearWeights(q, scale, b)
    x = torch.randn(M, K)
    want = x.double() @ (q.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
    for split in (1, 2, 3, 8):  # 8 splits of 64: more splits than 300 / 64 blocks
        got = matmul(x, lw, (16, 32, 64, 4, 1, split))
        assert got.shape == (M, N)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), split
    # matmul_config's own choice (four splits for a short weight at decode rows), and one launch for a prompt
    for split_k in (True, False):
        assert torch.allclose(matmul(x, lw, split_k=split_k).double(), want, rtol=1e-4, atol=1e-5), split_k


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("swap", [False, True])
def test_the_residual_is_added_inside_the_matmul(split, swap):
    """A decode step's residual after the int8 matmul (dense, fc2), inside its launches (the split sum's epilogue
    where K is split): the product plus the residual, written over the residual when it is also the output."""
    for K in (256, 300):
        torch.manual_seed(K + split)
        N, M = 40, 3
        q, scale = quantize_per_channel(torch.randn(N, K) * 0.02)
        b = torch.randn(N)
        lw = LinearWeights(q, scale, b)
        x = torch.randn(M, K)
        residual = torch.randn(M, N)
        want = x.double() @ (q.double() * scale.double()[:, None]).T + b.double() + residual.double()
        config = (16, 32, 64, 4, 1, split)
        got = matmul(x, lw, config, swap=swap, residual=residual)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), (K, split, swap)
        out = residual.clone()
        got = matmul(x, lw, config, swap=swap, residual=out, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), (K, split, swap)


def test_the_matmul_refuses_to_write_over_its_input():
    q, scale = quantize_per_channel(torch.randn(8, 64))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="must not be its input"):
        matmul(x, LinearWeights(q, scale, None), (16, 32, 64, 4, 1, 1), out=x[:, :8])


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("K", [256, 300])
def test_swiglu_is_made_in_the_matmuls_epilogue(swap, K):
    """fc1 at decode rows: silu(x W[:F].T) * x W[F:].T from one launch, each program summing both halves' rows,
    with bias and the residual after it, equal to the dequantised product's SwiGLU; K splits are not taken."""
    torch.manual_seed(K)
    F_, M = 24, 3
    q, scale = quantize_per_channel(torch.randn(2 * F_, K) * 0.05)
    b = torch.randn(2 * F_)
    lw = LinearWeights(q, scale, b)
    x = torch.randn(M, K)
    y = x.double() @ (q.double() * scale.double()[:, None]).T + b.double()
    want = torch.nn.functional.silu(y[:, :F_]) * y[:, F_:]
    for config in ((16, 16, 64, 4, 1, 1), (16, 32, 64, 4, 1, 3)):  # (a split asked for: one launch all the same)
        got = matmul(x, lw, config, swap=swap, swiglu=True)
        assert got.shape == (M, F_)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5), config
    residual = torch.randn(M, F_)
    got = matmul(x, lw, swap=swap, swiglu=True, residual=residual)  # matmul_config's tiles, halved
    assert torch.allclose(got.double(), want + residual.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("swap", [False, True])
def test_fp16_rows_widen_int8_weights_exactly_in_registers(swap, monkeypatch):
    """fp16 rows take the int8 weights widened in registers by the exponent trick (WIDEN, inline PTX run by
    tests/ptx_emulator.py): the same product as the conversion, with the residual and SwiGLU's halves."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import packed_products

    monkeypatch.setattr(packed_products, "tried", lambda: True)  # (a GPU's choice: the emulator stands in)
    torch.manual_seed(5)
    N, M, K = 40, 3, 256
    q, scale = quantize_per_channel(torch.randn(N, K) * 0.02)
    lw = LinearWeights(q, scale, None)
    x = torch.randn(M, K).half()
    w = q.double() * scale.double()[:, None]
    residual = torch.randn(M, N).half()
    with interpreted_inline_ptx():
        got = matmul(x, lw, (16, 32, 64, 4, 1, 1), swap=swap, residual=residual)
        up = matmul(x, lw, (16, 32, 64, 4, 1, 1), swap=swap, swiglu=True)
    want = x.double() @ w.T
    assert torch.allclose(got.double(), want + residual.double(), rtol=1e-2, atol=1e-2), swap
    a, b = want.chunk(2, dim=-1)
    assert torch.allclose(up.double(), torch.nn.functional.silu(a) * b, rtol=1e-2, atol=1e-2), swap


@pytest.mark.parametrize("swap", [False, True])
def test_each_tiles_last_program_adds_the_partials_as_the_sum_kernel_does(swap, monkeypatch):
    """Split K with the tile counters (the default): the last program of each output tile adds the splits'
    partials in order, so the result (bias and residual in place included) is the separate sum kernel's bit for bit,
    and every counter is back at zero for the next launch; with no counters (GLMCHAT_SPLIT_LAST_SUMS=0, or none
    yet during a capture) the sum kernel runs."""
    from backend.kernels import int8_matmul as MM

    torch.manual_seed(5)
    N, M, K = 72, 3, 300
    q, scale = quantize_per_channel(torch.randn(N, K) * 0.02)
    lw = LinearWeights(q, scale, torch.randn(N))
    x, residual = torch.randn(M, K), torch.randn(M, N)

    def product(split):
        out = residual.clone()
        return matmul(x, lw, (16, 16, 64, 4, 1, split), swap=swap, residual=out, out=out)

    launched, real = [], MM._split_sum_kernel
    monkeypatch.setattr(MM, "_split_sum_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        launched.append(grid) or real[grid])})())
    for split in (2, 3, 5):
        monkeypatch.setenv("GLMCHAT_SPLIT_LAST_SUMS", "1")
        with_counters = product(split)
        assert not launched and int(MM._counters[torch.device("cpu")].abs().sum()) == 0, split
        monkeypatch.setenv("GLMCHAT_SPLIT_LAST_SUMS", "0")
        assert torch.equal(with_counters, product(split)) and launched, split
        launched.clear()
