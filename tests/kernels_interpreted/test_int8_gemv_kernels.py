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


def rel(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("k", [256, 200])
@pytest.mark.parametrize("cvt", [0, 1, 2])
def test_x_tile_gemv_equals_the_reference_for_each_int8_conversion(k, cvt):
    torch.manual_seed(k + cvt)
    q, scale = quantize_per_channel(torch.randn(24, k) * 0.05)
    lw = LinearWeights(q, scale, None)
    x, g = torch.randn(k), 1 + 0.1 * torch.randn(k)
    for cfg in (GemvConfig(block_p=2, block_k=64, cvt=cvt, x_tile=True),
                GemvConfig(block_p=4, block_k=128, cvt=cvt, prefetch=True, x_tile=True),
                GemvConfig(block_p=2, block_k=0, cvt=3, programs_per_sm=2)):  # (float32 x: the tiled kernel, cvt 2)
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
    without, for RMSNorm, the residual in place and SwiGLU; K 200 leaves a tail, K 512 is whole tiles. A persistent
    tile at K 200 (not whole 16-byte groups) runs as the tiled kernel at the default K tile."""
    from ptx_emulator import interpreted_inline_ptx

    torch.manual_seed(k)
    q, scale = quantize_per_channel(torch.randn(24, k) * 0.05)
    lw = LinearWeights(q, scale, None)
    x, g = torch.randn(k).half(), (1 + 0.1 * torch.randn(k)).half()
    tol = dict(rtol=2e-2, atol=2e-2)  # fp16 products summed in pairs of lanes
    with interpreted_inline_ptx():
        for cfg in (GemvConfig(block_p=2, block_k=64, cvt=3), GemvConfig(block_p=2, block_k=64, cvt=3, prefetch=True),
                    GemvConfig(block_p=4, block_k=512, cvt=3, prefetch=True),
                    GemvConfig(block_p=2, block_k=0, cvt=3, programs_per_sm=1)):  # (K 200: the tiled kernel)
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


def check_each_epilogue(x, g, lw, plain, cfg):
    """gemv at ``cfg`` against the reference (within 2e-3: fp16 products, ~4e-4): the norm with lw's bias; then on
    ``plain`` (lw without it) the residual in place, SwiGLU, and the greedy pick of the plain product."""
    from backend.kernels import int8_gemv

    n = lw.weight.shape[0]
    out = torch.full((n,), float("nan"), dtype=torch.float16)
    gemv(x, lw, out, norm_weight=g, config=cfg)
    assert rel(out, reference(x, lw, norm=g) + lw.bias.double()) < 2e-3, cfg
    res = torch.randn(n).half()
    want = reference(x, plain, residual=res)
    gemv(x, plain, res, residual=res, config=cfg)
    assert rel(res, want) < 2e-3, cfg
    up = torch.full((n // 2,), float("nan"), dtype=torch.float16)
    gemv(x, plain, up, norm_weight=g, swiglu=True, config=cfg)
    assert rel(up, reference(x, plain, norm=g, swiglu=True)) < 2e-3, cfg
    state, token = int8_gemv.new_argmax_state("cpu"), torch.zeros(1, dtype=torch.int64)
    gemv(x, plain, out, config=cfg, argmax=state)
    int8_gemv.pick_token(state, token, None, bad_token=0)
    assert int(token) == int(out.float().argmax()), cfg


@pytest.mark.parametrize("n,k", [(24, 512), (26, 208)])
def test_the_persistent_gemv_equals_the_reference_for_each_epilogue(n, k, monkeypatch):
    """``programs_per_sm`` (kernels/persistent_gemv.py; inline PTX run by tests/ptx_emulator.py): a few programs each
    looping over blocks of row pairs, the row and its norm loaded once: RMSNorm with a bias, the residual in place,
    SwiGLU, and the greedy pick; K 208 pads 26 words to 32 (masked groups); N 26 leaves a partial last block. The
    interpreter stands for 2 multiprocessors, so each program takes 2-4 blocks, the last past the end."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import persistent_gemv

    ran = []
    real = persistent_gemv.launch
    monkeypatch.setattr(persistent_gemv, "launch", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    torch.manual_seed(n + k)
    q, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    lw = LinearWeights(q, scale, (0.1 * torch.randn(n)).half())
    plain = LinearWeights(q, scale, None)
    x, g = torch.randn(k).half(), (1 + 0.1 * torch.randn(k)).half()
    with interpreted_inline_ptx():
        for cfg in (GemvConfig(block_p=2, cvt=3, programs_per_sm=1), GemvConfig(block_p=4, cvt=3, programs_per_sm=2)):
            check_each_epilogue(x, g, lw, plain, cfg)
    assert len(ran) == 8


def test_the_persistent_gemv_rotary_epilogue_equals_the_tiled_kernels():
    """The QKV's rotary and cache write after the persistent kernel's sums: q and the row's key and value as the
    tiled kernel writes them (fp16 products in another order: within rounding)."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import attention_batch as A

    torch.manual_seed(3)
    H, G, D, S, K = 4, 2, 16, 40, 64
    N = (H + 2 * G) * D
    w8, scale = quantize_per_channel(torch.randn(N, K) * 0.1)
    lw = LinearWeights(w8, scale, (torch.randn(N) * 0.1).half())
    x, g = torch.randn(K).half(), (1 + 0.1 * torch.randn(K)).half()
    inv_freq = A.rotary_inv_freq(D // 2, "cpu").half().float()
    outs = []
    with interpreted_inline_ptx():
        for cfg in (GemvConfig(block_p=2, block_k=64, cvt=3), GemvConfig(block_p=2, cvt=3, programs_per_sm=1)):
            out, kc, vc = torch.empty(N).half(), torch.zeros(G, S, D).half(), torch.zeros(G, S, D).half()
            rope = dict(q_rows=H * D, kv_rows=G * D, head_dim=D, inv_freq=inv_freq, pos=torch.tensor([11]),
                        prefix=torch.tensor([5]), angle_dtype=torch.float16, k_cache=kc, v_cache=vc)
            gemv(x, lw, out, norm_weight=g, eps=1e-5, rope=rope, config=cfg)
            outs.append((out[: H * D], kc, vc))  # (the epilogue writes q to out, k and v to the cache)
    for a, b in zip(*outs):
        assert rel(a, b.double()) < 2e-3
    assert bool(outs[1][1][:, 16].abs().sum() > 0) and bool(outs[1][1][:, 15].abs().sum() == 0)


@pytest.mark.parametrize("n,k", [(40, 256), (26, 200)])
def test_the_persistent_gemv_on_16_bit_weights(n, k, monkeypatch):
    """The persistent kernel on fp16 weights (the bf16 model's linears; the 8-bit model's output layer): float32
    products, the norm, a bias, the residual in place, SwiGLU and the greedy pick; K 200 pads 25 groups of 8 to 32."""
    from backend.kernels import persistent_gemv

    ran = []
    real = persistent_gemv.launch
    monkeypatch.setattr(persistent_gemv, "launch", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    torch.manual_seed(n + k)
    w = (torch.randn(n, k) * 0.05).half()
    lw, plain = LinearWeights(w, None, (0.1 * torch.randn(n)).half()), LinearWeights(w, None, None)
    x, g = torch.randn(k).half(), (1 + 0.1 * torch.randn(k)).half()
    for cfg in (GemvConfig(block_p=2, block_k=0, programs_per_sm=1), GemvConfig(block_p=4, block_k=0, programs_per_sm=2,
                                                                                 num_warps=8)):
        check_each_epilogue(x, g, lw, plain, cfg)
    assert len(ran) == 8


@pytest.mark.parametrize("weights", ["int8", "float"])
def test_the_persistent_gemv_asks_l2_for_the_blocks_it_reads_next(weights):
    """``l2_ahead`` (kernels/weight_prefetch.py; the ranges recorded by tests/ptx_emulator.py), two programs of eight
    blocks, two blocks ahead, with padding groups along K. The output is bit for bit the one without prefetches. A
    program asks, before its loop, for the two blocks after its first, then in each iteration for the block three on,
    and nothing past the last block. In fc1's form (SwiGLU: row pair p is rows p and p + N/2) a block is two ranges,
    its rows a and its rows b; plain (rows 2p and 2p + 1), one."""
    import ptx_emulator
    from ptx_emulator import interpreted_inline_ptx

    torch.manual_seed(5)
    n, k = 64, 208 if weights == "int8" else 200  # 13 groups of 16 bytes in 16; 25 in 32
    if weights == "int8":
        q, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
        lw = LinearWeights(q, scale, None)
    else:
        lw = LinearWeights((torch.randn(n, k) * 0.05).half(), None, None)
    x, g = torch.randn(k).half(), (1 + 0.1 * torch.randn(k)).half()
    base, row_bytes = lw.weight.data_ptr(), k * lw.weight.element_size()
    order = [2, 4, 6, 8, 10, 12, 14] + [3, 5, 7, 9, 11, 13, 15]  # program 0 (blocks 0, 2, .., 14), then program 1
    for swiglu in (True, False):
        outs = []
        with interpreted_inline_ptx():
            for ahead in (0, 2):
                ptx_emulator.PREFETCHED.clear()
                cfg = GemvConfig(block_p=2, block_k=0, cvt=3 if weights == "int8" else 2, programs_per_sm=1,
                                 l2_ahead=ahead)
                out = torch.full((n // 2 if swiglu else n,), float("nan"), dtype=torch.float16)
                gemv(x, lw, out, norm_weight=g, swiglu=swiglu, config=cfg)
                outs.append(out)
        assert torch.equal(outs[0], outs[1])
        if swiglu:  # block b: pairs 2b, 2b + 1 = rows 2b, 2b + 1 and, N/2 on, their up rows
            want = [(base + (r + 2 * b) * row_bytes, 2 * row_bytes) for b in order for r in (0, n // 2)]
        else:  # block b: pairs 2b, 2b + 1 = rows 4b .. 4b + 3
            want = [(base + 4 * b * row_bytes, 4 * row_bytes) for b in order]
        assert ptx_emulator.PREFETCHED == want, swiglu
