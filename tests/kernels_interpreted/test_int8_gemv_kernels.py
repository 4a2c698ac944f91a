"""The one-row GEMV (backend/kernels/int8_gemv.gemv) under Triton's interpreter: the tiles that load x in the weight
tile's layout (``x_tile``: their RMSNorm and CVT-2 sums in a pass of their own) give the same outputs as the
default tiles, for each int8 conversion, with RMSNorm, the residual in place, SwiGLU and a K tail. Run through
tests/test_kernels_batch.py."""

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
from backend.kernels.int8_gemv import GemvConfig, gemv  # noqa: E402


def reference(x, lw, norm=None, residual=None, swiglu=False, eps=1e-5):
    x = x.double()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean() + eps) * norm.double()
    w = lw.weight.double() * (lw.scale.double()[:, None] if lw.scale is not None else 1.0)
    y = w @ x
    if swiglu:
        a, b = y.chunk(2)
        y = torch.nn.functional.silu(a) * b
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("cvt", [0, 1, 2])
def test_x_tile_gemv_equals_the_reference_for_each_int8_conversion(k, cvt):
    torch.manual_seed(k + cvt)
    q, scale = quantize_per_channel(torch.randn(24, k) * 0.05)
    lw = LinearWeights(q, scale, None)
    x, g = torch.randn(k), 1 + 0.1 * torch.randn(k)
    for cfg in (GemvConfig(block_p=2, block_k=64, cvt=cvt, x_tile=True),
                GemvConfig(block_p=4, block_k=128, cvt=cvt, prefetch=True, x_tile=True)):
        out = torch.full((24,), float("nan"))
        gemv(x, lw, out, norm_weight=g, config=cfg)
        assert torch.allclose(out.double(), reference(x, lw, norm=g), rtol=1e-4, atol=1e-4), cfg
        res = torch.randn(24)
        want = reference(x, lw, residual=res)
        gemv(x, lw, res, residual=res, config=cfg)  # in place, as the decoder adds to its residual stream
        assert torch.allclose(res.double(), want, rtol=1e-4, atol=1e-4), cfg
        up = torch.full((12,), float("nan"))
        gemv(x, lw, up, norm_weight=g, swiglu=True, config=cfg)
        assert torch.allclose(up.double(), reference(x, lw, norm=g, swiglu=True), rtol=1e-4, atol=1e-4), cfg


def test_x_tile_gemv_on_16_bit_weights():
    """The 16-bit output layer's GEMV (no int8 conversion, no scale)."""
    torch.manual_seed(1)
    lw = LinearWeights(torch.randn(40, 192) * 0.05, None, None)
    x, g = torch.randn(192), 1 + 0.1 * torch.randn(192)
    out = torch.full((40,), float("nan"))
    gemv(x, lw, out, norm_weight=g, config=GemvConfig(block_p=4, block_k=64, x_tile=True))
    assert torch.allclose(out.double(), reference(x, lw, norm=g), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [512, 200])
def test_packed_products_gemv_equals_the_reference_with_and_without_its_first_tile_loaded_early(k):
    """CVT 3 (int8 widened two at a time, fp16 products; inline PTX run by tests/ptx_emulator.py): with the first
    weight tile loaded before the wait on the previous kernel and each next one a tile ahead (``prefetch``), and
    without, for RMSNorm, the residual in place and SwiGLU; K 200 leaves a tail, K 512 is whole tiles."""
    from ptx_emulator import interpreted_inline_ptx

    torch.manual_seed(k)
    q, scale = quantize_per_channel(torch.randn(24, k) * 0.05)
    lw = LinearWeights(q, scale, None)
    x, g = torch.randn(k).half(), (1 + 0.1 * torch.randn(k)).half()
    tol = dict(rtol=2e-2, atol=2e-2)  # fp16 products summed in pairs of lanes
    with interpreted_inline_ptx():
        for cfg in (GemvConfig(block_p=2, block_k=64, cvt=3), GemvConfig(block_p=2, block_k=64, cvt=3, prefetch=True),
                    GemvConfig(block_p=4, block_k=512, cvt=3, prefetch=True)):
            out = torch.full((24,), float("nan"), dtype=torch.float16)
            gemv(x, lw, out, norm_weight=g, config=cfg)
            assert torch.allclose(out.double(), reference(x, lw, norm=g), **tol), cfg
            res = torch.randn(24).half()
            want = reference(x, lw, residual=res)
            gemv(x, lw, res, residual=res, config=cfg)
            assert torch.allclose(res.double(), want, **tol), cfg
            up = torch.full((12,), float("nan"), dtype=torch.float16)
            gemv(x, lw, up, norm_weight=g, swiglu=True, config=cfg)
            assert torch.allclose(up.double(), reference(x, lw, norm=g, swiglu=True), **tol), cfg
