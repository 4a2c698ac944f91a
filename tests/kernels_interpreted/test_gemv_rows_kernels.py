"""The few-rows GEMV (backend/kernels/gemv_rows.py) under Triton's interpreter: for 2-4 activation rows, every
config it may be tuned to (its own kernel's and quant_words') and every int8 conversion gives the dequantised
product with RMSNorm, bias, SwiGLU and the residual (in place too), for K and N that fill the tiles and that do
not; 16-bit (here fp16 and fp32) weights give their product through every 16-bit config. Run through
tests/test_kernels_batch.py."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels.gemv_rows import RowsGemvConfig, candidate_configs, gemv_rows, takes  # noqa: E402


def reference(x, lw, norm=None, swiglu=False, residual=None, eps=1e-5):
    x = x.double()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    w = lw.weight.double() if lw.scale is None else lw.weight.double() * lw.scale.double()[:, None]
    y = x @ w.T
    if lw.bias is not None:
        y = y + lw.bias.double()
    if swiglu:
        a, b = y.chunk(2, dim=-1)
        y = F.silu(a) * b
    return y if residual is None else y + residual.double()


def weights(n, k, bias, seed):
    torch.manual_seed(seed)
    q, scale = quantize_per_channel(torch.randn(n, k) * 0.05)
    return LinearWeights(q, scale, torch.randn(n) * 0.1 if bias else None)


SMALL = [RowsGemvConfig(8, 64), RowsGemvConfig(4, 128, cvt=0), RowsGemvConfig(16, 64, cvt=1), RowsGemvConfig(2, 256),
         RowsGemvConfig(4, 64, kernel="gemv_acc"), RowsGemvConfig(2, 128, cvt=1, kernel="gemv_acc"),
         RowsGemvConfig(4, 64, kernel="words"), RowsGemvConfig(2, 128, kernel="words"),
         RowsGemvConfig(4, 64, cvt=0, kernel="words")]


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("k", [256, 200])
def test_plain_rows_with_norm_bias_and_residual_equal_the_dequantised_product(m, k):
    lw = weights(20, k, bias=True, seed=m * k)
    x, g = torch.randn(m, k), 1 + 0.1 * torch.randn(k)
    for cfg in SMALL:
        want = reference(x, lw)
        assert torch.allclose(gemv_rows(x, lw, config=cfg).double(), want, rtol=1e-4, atol=1e-4), cfg
        res = torch.randn(m, 20)
        want = reference(x, lw, norm=g, residual=res)
        got = gemv_rows(x, lw, norm_weight=g, residual=res, config=cfg)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), cfg
        # in place, as the decoder adds a linear's output to its residual stream
        got = gemv_rows(x, lw, norm_weight=g, residual=res, out=res, config=cfg)
        assert got.data_ptr() == res.data_ptr() and torch.allclose(res.double(), want, rtol=1e-4, atol=1e-4), cfg


@pytest.mark.parametrize("m", [2, 4])
def test_swiglu_rows_read_the_gate_and_up_halves(m):
    k, f = 192, 12
    lw = weights(2 * f, k, bias=False, seed=m)
    x, g, res = torch.randn(m, k), 1 + 0.1 * torch.randn(k), torch.randn(m, f)
    words = [c for c in candidate_configs(swiglu=True) if c.kernel == "words"][:1]
    for cfg in SMALL + candidate_configs(swiglu=True)[:1] + words:
        want = reference(x, lw, norm=g, swiglu=True, residual=res)
        got = gemv_rows(x, lw, norm_weight=g, swiglu=True, residual=res, config=cfg)
        assert got.shape == (m, f) and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_16_bit_weights_give_their_product_through_every_16_bit_config(dtype, swiglu):
    """A bf16/fp16 model's compare rows: no scale, no int8 conversion, the same epilogues; every tile the tuner may
    pick for 16-bit weights (scaled down to this K), and K tails."""
    for k in (256, 200):
        torch.manual_seed(k)
        n = 24
        lw = LinearWeights((torch.randn(n, k) * 0.05).to(dtype), None, None if swiglu else (torch.randn(n) * 0.1).to(dtype))
        configs = [dataclasses.replace(c, block_k=c.block_k // 8) for c in candidate_configs(swiglu, int8=False)]
        assert {c.kernel for c in configs} == {"gemv", "gemv_acc"}
        for m in (2, 3):
            x, g = torch.randn(m, k).to(dtype), (1 + 0.1 * torch.randn(k)).to(dtype)
            res = torch.randn(m, n // 2 if swiglu else n).to(dtype)
            want = reference(x.float(), LinearWeights(lw.weight.float(), None, None if lw.bias is None else lw.bias.float()),
                             norm=g.float(), swiglu=swiglu, residual=res.float())
            tol = 1e-4 if dtype == torch.float32 else 2e-3
            for cfg in configs:
                got = gemv_rows(x, lw, norm_weight=g, swiglu=swiglu, residual=res, config=cfg)
                assert got.dtype == dtype and torch.allclose(got.double(), want, rtol=tol, atol=tol), (k, m, cfg)


def test_strided_rows_and_the_default_config():
    """Rows taken from a wider buffer (the decoder's views), with the untuned default config on the CPU."""
    lw = weights(40, 256, bias=False, seed=1)
    wide = torch.randn(3, 300)
    x = wide[:, :256]
    assert x.stride(0) == 300
    assert torch.allclose(gemv_rows(x, lw).double(), reference(x, lw), rtol=1e-4, atol=1e-4)


def test_it_takes_two_to_four_int8_or_floating_rows_only():
    lw = weights(8, 64, bias=False, seed=2)
    assert [takes(torch.zeros(m, 64), lw) for m in range(1, 6)] == [False, True, True, True, False]
    assert takes(torch.zeros(2, 64), LinearWeights(torch.randn(8, 64).half()))
    assert not takes(torch.zeros(2, 64), None)  # (a 4-bit layer has no such weights)
    with pytest.raises(ValueError, match="2-4 rows"):
        gemv_rows(torch.zeros(5, 64), lw)
    with pytest.raises(ValueError, match="words kernel reads int8"):
        gemv_rows(torch.zeros(2, 64), LinearWeights(torch.randn(8, 64)), config=RowsGemvConfig(4, 64, kernel="words"))


def test_the_callers_matmul_path_is_kept_where_it_timed_faster(tmp_path, monkeypatch):
    """Tuning times the caller's other path (the int8 matmul) among the GEMV's configs: None when it won, so the
    caller keeps it on that card; a GEMV config when the GEMV won. Each outcome is cached on disk."""
    from backend.kernels import gemv_rows as G

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    lw = weights(16, 64, bias=False, seed=3)
    ran = []

    def other(x):
        ran.append(x.shape)

    def timer_favouring(other_wins: bool):
        def timer(fn):
            before = len(ran)
            fn()
            return 1.0 if (len(ran) > before) == other_wins else 2.0
        return timer

    cpu = torch.device("cpu")
    assert G.tuned_config(lw, 2, torch.float32, cpu, False, other=other, timer=timer_favouring(True)) is None
    assert ran and ran[-1] == (2, 64)
    cfg = G.tuned_config(lw, 3, torch.float32, cpu, True, norm=True, other=other, timer=timer_favouring(False))
    assert cfg is not None and cfg.kernel == "gemv"
    cached = sorted(p.name for p in (tmp_path / "kernel-tuning").iterdir())
    assert cached == ["cpu.json"] and "vs_matmul" in (tmp_path / "kernel-tuning" / "cpu.json").read_text()


def test_a_config_that_computes_another_result_on_the_card_is_never_picked(tmp_path, monkeypatch):
    """Tuning compares each config's output with the default config's: a config a compiler gets wrong (here the words
    kernel, its output negated after it runs) is left out even where it times fastest, and the user is told."""
    from backend.kernels import gemv_rows as G

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    lw = weights(16, 64, bias=False, seed=3)
    launched, real_launch = [], G._launch

    def miscompiled(x, lw, out, norm_weight, residual, eps, swiglu, cfg, qw=None, rope=None):
        real_launch(x, lw, out, norm_weight, residual, eps, swiglu, cfg, qw, rope)
        launched.append(cfg)
        if cfg.kernel == "words":
            out.neg_()
        return out

    def timer(fn):
        fn()
        return 1.0 if launched[-1].kernel == "words" else 2.0  # the broken config is the fastest

    monkeypatch.setattr(G, "_launch", miscompiled)
    with pytest.warns(UserWarning, match="compute a different result from the default"):
        cfg = G.tuned_config(lw, 2, torch.float32, torch.device("cpu"), False, timer=timer)
    assert any(c.kernel == "words" for c in launched) and cfg.kernel == "gemv"


def test_half_rows_of_odd_stride_fall_back_from_a_tuned_words_config(monkeypatch):
    """The words kernel reads 16-bit rows as int32 pairs: rows it cannot read take the default kernel instead."""
    from backend.kernels import gemv_rows as G

    lw = weights(16, 128, bias=False, seed=3)
    monkeypatch.setattr(G, "tuned_config", lambda *a, **k: RowsGemvConfig(4, 64, kernel="words"))
    x = torch.randn(2, 129).half()[:, 1:]  # row stride 129
    want = reference(x.float(), lw)
    assert torch.allclose(gemv_rows(x, lw).double(), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="words kernel"):
        gemv_rows(x, lw, config=RowsGemvConfig(4, 64, kernel="words"))


@pytest.mark.parametrize("m", [2, 3])
def test_a_qkv_linear_rotates_and_writes_the_cache_in_the_words_kernel_as_the_rotary_kernel_after_it(m, tmp_path,
                                                                                                     monkeypatch):
    """compare's QKV through gemv_rows with ``rope``: the words kernel's rotary epilogue (q left in the output, k and
    v in each row's slot after its prefix, an idle row writing none) equals the plain product followed by the rotary
    kernel, bit for bit; a config without the epilogue runs the rotary kernel after itself. Tuning times each
    config with its rotary (a key of its own) and keeps one that agrees."""
    from backend.kernels import attention_batch as A
    from backend.kernels import gemv_rows as G

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    H, G_, D, S = 4, 2, 16, 24
    lw = weights((H + 2 * G_) * D, 256, bias=True, seed=m)
    x, g = torch.randn(m, 256), 1 + 0.1 * torch.randn(256)
    pos, pre = torch.tensor([9, -1, 2][:m]), torch.tensor([3, 0, 1][:m])
    inv_freq = A.rotary_inv_freq(D // 2, "cpu")

    def rope():
        cache = torch.full((m, G_, S, D), 7.0)
        return A.RopeWrite(cache, cache.clone(), pos, pre, H, G_, inv_freq, 2.0)

    for cfg in SMALL[:1] + [c for c in SMALL if c.kernel == "words"]:
        want = rope()
        qkv = gemv_rows(x, lw, norm_weight=g, config=cfg)
        q_want = A.rope_cache_write(qkv, want.k_cache, want.v_cache, pos, pre, num_heads=H, num_groups=G_,
                                    inv_freq=inv_freq, position_divisor=2.0)
        got = rope()
        q = gemv_rows(x, lw, norm_weight=g, config=cfg, rope=got)
        assert torch.equal(q, q_want) and torch.equal(got.k_cache, want.k_cache), cfg
        assert torch.equal(got.v_cache, want.v_cache) and bool((got.k_cache[1] == 7.0).all()), cfg

    def timer(fn):  # the words configs fastest
        fn()
        return 1.0 if timed[-1].kernel == "words" else 2.0

    timed, real_launch = [], G._launch
    monkeypatch.setattr(G, "_launch", lambda *a, **k: timed.append(a[7]) or real_launch(*a, **k))
    cfg = G.tuned_config(lw, m, torch.float32, torch.device("cpu"), False, norm=True, timer=timer, rope=rope())
    assert cfg.kernel == "words" and "|rope" in (tmp_path / "kernel-tuning" / "cpu.json").read_text()


@pytest.mark.parametrize("weights_kind", ["int8", "fp16"])
def test_two_rows_through_the_persistent_kernel_equal_the_product(weights_kind, monkeypatch):
    """persistent_gemv at two rows (compare's; int8 against fp16 rows with its products run by tests/ptx_emulator.py,
    or fp16 weights): each row its own RMSNorm factor, a bias, the residual in place, SwiGLU with a residual after
    it, rows at a stride; rows it cannot read (three of them, fp32 rows against int8) take the default tile."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import persistent_gemv
    from backend.kernels.gemv_rows import persistent_configs

    ran = []
    real = persistent_gemv.launch_rows
    monkeypatch.setattr(persistent_gemv, "launch_rows", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    n, k = 26, 208
    lw = weights(n, k, bias=True, seed=7)
    lw = LinearWeights(lw.weight, lw.scale, lw.bias.half()) if weights_kind == "int8" else \
        LinearWeights((lw.weight.float() * lw.scale[:, None]).half(), None, lw.bias.half())
    plain = LinearWeights(lw.weight, lw.scale, None)
    wide = torch.randn(2, k + 24).half()
    x = wide[:, :k]  # rows at a stride of k + 24 (48 bytes more: 16-byte aligned)
    x[1] *= 4
    g = (1 + 0.1 * torch.randn(k)).half()
    rel = lambda got, want: float((got.double() - want).norm() / want.norm())  # noqa: E731
    monkeypatch.delenv("GLMCHAT_PERSISTENT_GEMV", raising=False)
    assert persistent_configs(weights_kind == "int8", 2, torch.float16) == []
    monkeypatch.setenv("GLMCHAT_PERSISTENT_GEMV", "all")
    tiles = persistent_configs(weights_kind == "int8", 2, torch.float16)
    assert tiles and persistent_configs(True, 3, torch.float16) == [] and persistent_configs(True, 2, torch.float32) == []
    with interpreted_inline_ptx():
        for cfg in (tiles[0], dataclasses.replace(tiles[0], block_n=4, programs_per_sm=1)):
            out = torch.full((2, n), float("nan"), dtype=torch.float16)
            gemv_rows(x, lw, norm_weight=g, out=out, config=cfg)
            for m in range(2):
                assert rel(out[m], reference(x[m:m + 1], lw, norm=g)[0]) < 2e-3, (cfg, m)
            res = torch.randn(2, n).half()
            want = reference(x, plain, residual=res)
            gemv_rows(x, plain, residual=res, out=res, config=cfg)
            assert rel(res, want) < 2e-3, cfg
            res = torch.randn(2, n // 2).half()
            up = gemv_rows(x, plain, norm_weight=g, swiglu=True, residual=res, config=cfg)
            assert rel(up, reference(x, plain, norm=g, swiglu=True, residual=res)) < 2e-3, cfg
        assert len(ran) == 6
        three = torch.randn(3, k).half()
        out = gemv_rows(three, lw, config=tiles[0])  # (three rows: the default tile)
        assert rel(out, reference(three, lw)) < 2e-3 and len(ran) == 6
        if weights_kind == "int8":  # (float32 rows: no packed fp16 products)
            out = gemv_rows(x.float(), lw, config=tiles[0])
            assert rel(out, reference(x.float(), lw)) < 2e-3 and len(ran) == 6
