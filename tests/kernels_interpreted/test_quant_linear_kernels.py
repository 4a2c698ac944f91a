"""The 4-bit / int8 small-M linear kernels (backend/kernels/gemv_4bit.py) under Triton's CPU interpreter.

Run through tests/test_kernels_batch.py (which sets TRITON_INTERPRET=1 in a subprocess); skipped otherwise.
References are torch float32 math on weights unpacked independently of the kernels (bitsandbytes'
own dequantize_4bit for NF4, the release's documented packing rule for int4); outputs are poisoned first.
"""

from __future__ import annotations

import json
from dataclasses import replace
import os
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
triton = pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.kernels import tuning  # noqa: E402

GEMV_LUT2 = Q.QuantLinearConfig("gemv", block_n=4, block_k=128, lut=2)
GEMV_LUT1 = Q.QuantLinearConfig("gemv", block_n=8, block_k=64, lut=1)
GEMV_PER_WEIGHT = Q.QuantLinearConfig("gemv", block_n=4, block_k=256, lut=2, block_sum=False)
MM = Q.QuantLinearConfig("mm", block_n=16, block_k=64, block_m=16)
MM_SPLIT2 = Q.QuantLinearConfig("mm", block_n=16, block_k=64, block_m=16, split_k=2)
MM_SPLIT3 = Q.QuantLinearConfig("mm", block_n=16, block_k=64, block_m=16, split_k=3)
ROWS4 = Q.QuantLinearConfig("rows", block_n=4, block_k=64, block_m=4)
WORDS1 = Q.QuantLinearConfig("words", block_n=8, block_k=64, block_m=1, lut=1)
WORDS2 = Q.QuantLinearConfig("words", block_n=4, block_k=128, block_m=2, lut=1)
WORDS_PAIRS = Q.QuantLinearConfig("words", block_n=8, block_k=64, block_m=1, lut=2)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "an output element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bnb_nf4(n: int, k: int, nested: bool, dtype=torch.float32):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(n, k, dtype=torch.float32) * 0.02
    data, state = bnbf.quantize_4bit(w.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=nested)
    return data, state, bnbf.dequantize_4bit(data, state)


def run(x, w, cfg, **kw):
    out = torch.full((x.shape[0], w.n), float("nan"), dtype=x.dtype)
    return Q.quant_linear(x, w, out=out, config=cfg, **kw)


# whole blocks; blocks across rows (K % 64 != 0); a K tail (K % block_k != 0)
@pytest.mark.parametrize("n,k,nested", [(24, 192, False), (24, 192, True), (20, 200, False), (17, 320, True)])
def test_nf4_equals_bitsandbytes_dequantize_then_matmul(n, k, nested):
    data, state, ref_w = bnb_nf4(n, k, nested)
    w = Q.nf4_weight(data, state)
    assert torch.equal(w.dequantize(), ref_w)  # the layout as bitsandbytes reads it
    # (the interpreter runs a program at a time: GEMV programs per activation row cost, so small M for them)
    for m, cfg in ((1, GEMV_LUT2), (3, GEMV_LUT2), (1, GEMV_LUT1), (1, GEMV_PER_WEIGHT), (3, MM), (17, MM),
                   (1, WORDS1), (1, WORDS_PAIRS), (2, WORDS2), (3, WORDS2)):
        x = torch.randn(m, k)
        assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5, (m, cfg)


def test_nf4_nested_absmax_over_several_second_level_blocks():
    data, state, ref_w = bnb_nf4(72, 256, nested=True)  # 288 absmax blocks: two blocks of the nested absmax
    assert state.state2.absmax.numel() == 2
    w = Q.nf4_weight(data, state)
    x = torch.randn(2, 256)
    for cfg in (GEMV_LUT2, MM, WORDS2):
        assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5, cfg


def test_words_kernel_takes_a_rows_second_level_scale_once_a_row():
    """With 4 blocks a row (K = 256) every row lies within one group of 256 blocks, so the words kernel loads each
    row's second-level scale before its K loop: 160 rows span three groups, and SwiGLU's up rows (80 further) sit
    in other groups than their gate rows; one and two rows a program, with the first K step peeled off and not."""
    from backend.kernels.quant_words import row_scale2

    n, k = 160, 256
    data, state, ref_w = bnb_nf4(n, k, nested=True)
    assert state.state2.absmax.numel() == 3 and not torch.equal(state.state2.absmax[0], state.state2.absmax[1])
    w = Q.nf4_weight(data, state)
    assert row_scale2(w)
    assert not row_scale2(Q.nf4_weight(*bnb_nf4(24, 192, nested=True)[:2]))  # 3 blocks a row: rows across groups
    assert not row_scale2(Q.nf4_weight(*bnb_nf4(24, 256, nested=False)[:2]))
    g, res = 1 + 0.1 * torch.randn(k), torch.randn(2, n // 2)
    for m, cfg in ((1, WORDS1), (2, WORDS2), (1, replace(WORDS1, prefetch=True))):
        x = torch.randn(m, k)
        assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5, (m, cfg)
        out = torch.full((m, n // 2), float("nan"))
        Q.quant_linear(x, w, residual=res[:m], norm_weight=g, swiglu=True, out=out, config=cfg)
        assert rel(out, reference_norm_swiglu(x, ref_w, g, torch.zeros(n), res[:m])) < 1e-5, (m, cfg)


def test_nf4_half_activations_and_half_weights():
    # float16: the interpreter has no bfloat16 (bench/check_kernels_batch.py covers bf16 on the GPU)
    data, state, ref_w = bnb_nf4(24, 192, nested=True, dtype=torch.float16)
    w = Q.nf4_weight(data, state)
    x = torch.randn(5, 192).to(torch.float16)
    ref = x.float() @ ref_w.float().T
    for cfg in (GEMV_LUT2, MM, WORDS1, WORDS2):
        out = run(x, w, cfg)
        assert out.dtype == torch.float16
        assert rel(out, ref) < 2e-3


def pack_int4_release(w: torch.Tensor):
    """The chatglm2-6b-int4 rule: scale = max|w| / 7 per row (fp16), q = round(w / scale) in [-8, 7],
    byte j = (q[2j] << 4) | (q[2j+1] & 0xF) as int8."""
    scale = (w.abs().amax(dim=1) / 7).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-8, 7).to(torch.int32)
    packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8).view(torch.int8)
    return packed, scale, q


@pytest.mark.parametrize("n,k", [(20, 192), (13, 200)])
def test_int4_release_layout_and_kernels(n, k):
    packed, scale, q = pack_int4_release(torch.randn(n, k) * 0.02)
    w = Q.int4_release_weight(packed, scale)
    ref_w = q.float() * scale.float()[:, None]
    assert torch.equal(w.dequantize(), ref_w)  # even column in the high nibble, both signed
    assert (q < 0).any() and (q > 0).any()  # both signs exercised
    for m, cfg in ((1, GEMV_LUT2), (2, GEMV_LUT2), (4, MM), (17, MM), (1, WORDS1), (3, WORDS2)):
        x = torch.randn(m, k)
        assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5, (m, cfg)


def test_int8_small_m_with_bias_and_residual_in_place():
    n, k = 40, 200
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 1e-3
    w = Q.int8_weight(q, s)
    bias = torch.randn(n)
    for m in (2, 17):
        x = torch.randn(m, k)
        res = torch.randn(m, n)
        ref = x @ (q.float() * s[:, None]).T + bias + res
        out = res.clone()
        Q.quant_linear(x, w, bias, residual=out, out=out, config=MM)
        assert rel(out, ref) < 1e-5


def test_nf4_bias_residual_on_strided_rows():
    data, state, ref_w = bnb_nf4(24, 192, nested=False)
    w = Q.nf4_weight(data, state)
    big = torch.randn(3, 400)
    x = big[:, 8:200]  # row stride 400: a view of a wider buffer
    bias, res = torch.randn(24), torch.randn(3, 24)
    for cfg in (GEMV_LUT2, MM, WORDS1, WORDS2):
        out = run(x, w, cfg, bias=bias, residual=res)
        assert rel(out, x @ ref_w.T + bias + res) < 1e-5
        in_place = res.clone()  # as the decoder adds dense's and fc2's output to the residual stream
        Q.quant_linear(x, w, bias, residual=in_place, out=in_place, config=cfg)
        assert rel(in_place, x @ ref_w.T + bias + res) < 1e-5, cfg


def test_bad_shapes_say_what_is_wrong():
    data, state, _ = bnb_nf4(8, 64, nested=False)
    w = Q.nf4_weight(data, state)
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        Q.quant_linear(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="int8"):
        Q.int4_release_weight(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, dtype=torch.float16))


def test_tuning_picks_a_winner_caches_it_on_disk_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_loaded", {})
    monkeypatch.setattr(Q, "_chosen", {})
    data, state, ref_w = bnb_nf4(16, 128, nested=True)
    w = Q.nf4_weight(data, state)
    calls = []

    def timer(fn):
        calls.append(1)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    rng = torch.get_rng_state()
    cfg = Q.tuned_config(w, 1, torch.float32, torch.device("cpu"), timer=timer)
    assert len(calls) == len(Q.candidate_configs("nf4", 1))
    assert torch.equal(torch.get_rng_state(), rng)  # seeded sampling is not shifted by a first-use tuning
    files = list((tmp_path / "kernel-tuning").glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    (key, fields), = saved["configs"].items()
    assert "nf4n" in key and "N16" in key and "K128" in key and "M1" in key
    assert fields.pop("_among") == tuning.candidates_digest(Q.candidate_configs("nf4", 1))
    assert Q.QuantLinearConfig(**fields) == cfg
    monkeypatch.setattr(tuning, "_loaded", {})  # a new process: read from disk, nothing timed
    assert Q.tuned_config(w, 1, torch.float32, torch.device("cpu"), timer=timer) == cfg
    assert len(calls) == len(Q.candidate_configs("nf4", 1))
    x = torch.randn(1, 128)
    assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5
    monkeypatch.setattr(tuning, "_loaded", {})
    monkeypatch.setattr(Q, "_chosen", {})
    fewer = Q.candidate_configs("nf4", 1)[:2]  # the kernel's candidates changed since: tuned again
    monkeypatch.setattr(Q, "candidate_configs", lambda *a, **k: fewer)
    timed_before = len(calls)
    assert Q.tuned_config(w, 1, torch.float32, torch.device("cpu"), timer=timer) in fewer
    assert len(calls) == timed_before + 2


def random_weight(fmt: str, n: int, k: int, nested: bool):
    """A random [n, k] weight packed as ``fmt`` (nf4 with nested absmax or not, the int4 release, int8) and its
    unpacked float32 values, made independently of the kernels."""
    if fmt == "nf4":
        data, state, ref_w = bnb_nf4(n, k, nested=nested)
        return Q.nf4_weight(data, state), ref_w
    if fmt == "int4":
        packed, scale, q = pack_int4_release(torch.randn(n, k) * 0.02)
        return Q.int4_release_weight(packed, scale), q.float() * scale.float()[:, None]
    q, s = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 1e-3
    return Q.int8_weight(q, s), q.float() * s[:, None]


def reference_norm_swiglu(x, ref_w, g, bias, res, eps=1e-5):
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g
    y = xn @ ref_w.T + bias
    a, b = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(a) * b + res


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_fused_rmsnorm_prologue_and_swiglu_epilogue(fmt):
    """dense_h_to_4h as the decoder runs it: RMSNorm of each row, 2F weight rows, silu(a) * b (+ residual)."""
    n, k = 40, 192  # F = 20 output columns
    w, ref_w = random_weight(fmt, n, k, nested=True)
    g, bias = 1 + 0.1 * torch.randn(k), torch.randn(n) * 0.1
    configs = [(3, MM), (17, MM), (3, MM_SPLIT2), (17, MM_SPLIT3)]
    if fmt == "int8":
        configs += [(3, ROWS4), (1, ROWS4)]
    else:
        configs += [(1, GEMV_LUT2), (2, GEMV_LUT2), (1, GEMV_PER_WEIGHT), (1, WORDS1), (2, WORDS2), (3, WORDS2)]
    for m, cfg in configs:
        x, res = torch.randn(m, k) * 3, torch.randn(m, n // 2)
        out = torch.full((m, n // 2), float("nan"))
        Q.quant_linear(x, w, bias, residual=res, norm_weight=g, swiglu=True, out=out, config=cfg)
        assert rel(out, reference_norm_swiglu(x, ref_w, g, bias, res)) < 1e-5, (m, cfg)
        plain = Q.quant_linear(x, w, norm_weight=g, config=cfg)  # the norm alone (the output layer)
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
        assert rel(plain, xn @ ref_w.T) < 1e-5, (m, cfg)


def test_rows_kernel_with_a_k_tail_bias_residual_in_place_and_too_many_rows_refused():
    w = Q.int8_weight(torch.randint(-127, 128, (22, 200), dtype=torch.int8), torch.rand(22) * 1e-3)
    x, bias = torch.randn(4, 200), torch.randn(22) * 0.1
    ref = x @ w.dequantize().T + bias + 1.0
    out = torch.ones(4, 22)
    Q.quant_linear(x, w, bias, residual=out, out=out, config=ROWS4)
    assert rel(out, ref) < 1e-5
    with pytest.raises(ValueError, match="at most block_m=4 rows"):
        Q.quant_linear(torch.randn(5, 200), w, config=ROWS4)


@pytest.mark.parametrize("k", [200, 256])
def test_k_splits_equal_one_pass_with_a_k_tail_and_the_residual_in_place(k):
    """Split-K sums its parts in a fixed order: the same as one pass to float32 rounding, every run alike."""
    w = Q.int8_weight(torch.randint(-127, 128, (24, k), dtype=torch.int8), torch.rand(24) * 1e-3)
    x, bias = torch.randn(5, k), torch.randn(24) * 0.1
    one = Q.quant_linear(x, w, bias, residual=torch.ones(5, 24), config=MM)
    for cfg in (MM_SPLIT2, MM_SPLIT3, Q.QuantLinearConfig("mm", block_n=16, block_k=64, block_m=16, split_k=9)):
        out = torch.ones(5, 24)
        Q.quant_linear(x, w, bias, residual=out, out=out, config=cfg)
        assert rel(out, one) < 1e-6, cfg
        again = Q.quant_linear(x, w, bias, residual=torch.ones(5, 24), config=cfg)
        assert torch.equal(again, out)
    assert Q._k_splits(k, MM_SPLIT3) == (2, 128)  # 4 tiles of 64: two a split, none left empty
    assert Q._k_splits(k, replace(MM, split_k=9)) == (4, 64)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_batch_invariant_rows_do_not_depend_on_the_batch(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_loaded", {})
    monkeypatch.setattr(Q, "_chosen", {})
    if fmt == "nf4":
        data, state, _ = bnb_nf4(40, 192, nested=True)
        w = Q.nf4_weight(data, state)
    else:
        w = Q.int8_weight(torch.randint(-127, 128, (40, 192), dtype=torch.int8), torch.rand(40) * 1e-3)
    x = torch.randn(19, 192)
    full = Q.quant_linear(x, w, batch_invariant=True)
    for rows in (slice(0, 1), slice(5, 7), slice(3, 19)):
        assert torch.equal(Q.quant_linear(x[rows], w, batch_invariant=True), full[rows])


def test_quantized_weight_of_layers_as_loaded():
    """bitsandbytes Linear4bit (quantised on the CPU), an int4-release layer, a float layer."""
    from backend.decode.batch_linear import quantized_weight

    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64) * 0.02, requires_grad=False, quant_type="nf4")._quantize("cpu")
    w = quantized_weight(layer)
    assert (w.fmt, w.n, w.k, w.nested) == ("nf4", 32, 64, True)
    assert w.data.data_ptr() == layer.weight.data.data_ptr()  # shared, not copied
    ref = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(2, 64)
    assert rel(run(x, w, MM), x @ ref.T) < 1e-5

    packed, scale, q = pack_int4_release(torch.randn(8, 32) * 0.02)
    release = torch.nn.Module()
    release.weight, release.weight_scale, release.weight_bit_width = packed, scale, 4
    w4 = quantized_weight(release)
    assert w4.fmt == "int4" and torch.equal(w4.dequantize(), q.float() * scale.float()[:, None])
    by_width = torch.nn.Module()  # as backend's Int4Linear: in_features tells 4-bit (half the columns stored)
    by_width.weight, by_width.weight_scale, by_width.in_features = packed, scale, 32
    assert quantized_weight(by_width).fmt == "int4"
    by_width.in_features = 16  # the int8 release: one byte a column
    assert quantized_weight(by_width).fmt == "int8"
    assert quantized_weight(torch.nn.Linear(4, 4)) is None


@pytest.mark.parametrize("fmt,k", [("nf4", 192), ("nf4", 200), ("int4", 200), ("int8", 200)])
def test_words_kernel_with_norm_swiglu_and_a_k_tail_equals_the_reference(fmt, k):
    """The words kernel as fc1 and fc2 call it, for each weight format: a K tail (masked words), the norm and
    SwiGLU's two halves in one program, one or two rows a program; with the first K step peeled off the loop and
    loaded first (``prefetch``: before the wait on the kernel ahead, in the one-row step) and without."""
    n = 24
    w, ref_w = random_weight(fmt, n, k, nested=k % 64 == 0)
    g, res = 1 + 0.1 * torch.randn(k), torch.randn(2, n // 2)
    for m, cfg in ((1, WORDS1), (2, WORDS2), (1, replace(WORDS1, prefetch=True)), (2, replace(WORDS2, prefetch=True))):
        x = torch.randn(m, k)
        assert rel(run(x, w, cfg), x @ ref_w.T) < 1e-5, (m, cfg)
        out = torch.full((m, n // 2), float("nan"))
        Q.quant_linear(x, w, residual=res[:m], norm_weight=g, swiglu=True, out=out, config=cfg)
        assert rel(out, reference_norm_swiglu(x, ref_w, g, torch.zeros(n), res[:m])) < 1e-5, (m, cfg)


def test_words_kernel_reads_bf16_activations_as_int32_pairs():
    """bf16 rows reach the words kernel as int32 pairs widened by shifts (the interpreter has no bf16 tensors:
    the kernel never loads one, and a float32 output stands in for the bf16 one)."""
    from backend.kernels import quant_words

    data, state, ref_w = bnb_nf4(24, 192, nested=True)
    w = Q.nf4_weight(data, state)
    x = torch.randn(3, 200).to(torch.bfloat16)[:, :192]  # row stride 200: even, as the kernel needs
    assert quant_words.usable(x, w, None)
    for cfg in (WORDS1, WORDS2):
        out = torch.full((3, 24), float("nan"))
        quant_words.launch(x, w, out, None, None, None, 1e-5, False, cfg, False, out, out)
        assert rel(out, x.float() @ ref_w.T) < 1e-5, cfg


def test_words_kernel_refuses_what_it_cannot_read_and_tuned_calls_fall_back(monkeypatch):
    from backend.kernels import quant_words

    data, state, ref_w = bnb_nf4(24, 192, nested=False, dtype=torch.float16)
    w = Q.nf4_weight(data, state)
    odd = torch.randn(2, 193).to(torch.float16)[:, 1:]  # odd row stride: no int32 pairs
    assert not quant_words.usable(odd, w, None)
    with pytest.raises(ValueError, match="words kernel"):
        run(odd, w, WORDS1)
    monkeypatch.setitem(Q._chosen, ("quant_linear|nf4|bs64|N24|K192|M2|float16", "cpu"), WORDS2)  # as if tuned to it
    out = Q.quant_linear(odd, w)  # tuned to the words kernel, taken by the default for this call
    assert rel(out, odd.float() @ ref_w.float().T) < 2e-3


@pytest.mark.parametrize("fmt,n,k,nested", [("nf4", 40, 192, False), ("nf4", 40, 320, True), ("nf4", 21, 200, False),
                                            ("int4", 260, 200, False)])
def test_widened_blocks_equal_the_dequantized_weight_and_feed_cublas(fmt, n, k, nested, monkeypatch):
    """kernels/widen_4bit.py: any block of rows widened by the kernel is bit for bit the reference's (the
    layout read independently: bitsandbytes' dequantize for NF4, the release's packing rule for int4), and
    widened_4bit_linear in blocks of a few rows is x @ W.T + bias."""
    from backend import int8_linear
    from backend.decode.batch_linear import widened_4bit_linear
    from backend.kernels.widen_4bit import widen_rows

    if fmt == "nf4":
        data, state, ref_w = bnb_nf4(n, k, nested)
        w = Q.nf4_weight(data, state)
    else:
        packed, scale, q = pack_int4_release(torch.randn(n, k) * 0.02)
        w, ref_w = Q.int4_release_weight(packed, scale), q.float() * scale.float()[:, None]
    for rows in (slice(0, n), slice(3, 20), slice(n - 1, n)):
        for dtype in (torch.float32, torch.float16):  # (the interpreter has no bfloat16)
            got = widen_rows(w, rows, dtype, like=torch.empty(0))
            assert torch.equal(got, ref_w[rows].to(dtype)), (rows, dtype)
            assert torch.equal(w.dequantize(dtype, rows), ref_w[rows].to(dtype))  # the CPU fallback's rows too
    monkeypatch.setattr(int8_linear, "WIDEN_CHUNK_BYTES", 8 * k * 4)  # blocks of 128 rows (the least): 260 -> 3
    x, bias = torch.randn(5, k), torch.randn(n)
    assert rel(widened_4bit_linear(x, w, bias), x @ ref_w.T + bias) < 1e-6


def test_four_bit_rows_take_the_path_that_ran_faster(tmp_path, monkeypatch):
    """From WIDEN_4BIT_MIN_M rows a 4-bit BatchLinear times quant_linear against the widened weight once per
    row bucket (cached on disk with the kernels' tiles) and runs the faster; both give x @ W.T."""
    from types import SimpleNamespace

    from backend.decode import batch_linear

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_loaded", {})
    data, state, ref_w = bnb_nf4(24, 192, nested=False)
    layer = SimpleNamespace(weight=SimpleNamespace(data=data, quant_state=state), bias=None)
    monkeypatch.setattr(batch_linear, "quantized_weight", lambda module: Q.nf4_weight(data, state))
    lin = batch_linear.BatchLinear(layer, torch.float32, "dense")
    timed = []

    def widened_is_faster(key, candidates, run, device, timer=None):
        if not key.startswith("4bit_rows|"):  # quant_linear's own tiles: the default
            return candidates[0]
        timed.append(key)
        outs = [run(c) for c in candidates]
        assert rel(outs[0], outs[1]) < 1e-5  # the two paths agree
        return candidates[1]

    monkeypatch.setattr(tuning, "pick", widened_is_faster)
    calls = []
    def widened(x, w, b, residual=None, out=None):  # (no residual or out in these calls)
        calls.append(x.shape[0])
        return x @ ref_w.T

    monkeypatch.setattr(batch_linear, "widened_4bit_linear", widened)
    x = torch.randn(batch_linear.WIDEN_4BIT_MIN_M, 192)
    assert rel(lin(x), x @ ref_w.T) < 1e-5
    assert len(timed) == 1 and "M16" in timed[0] and batch_linear.WIDEN_4BIT_MIN_M in calls
    lin(x)
    assert len(timed) == 1  # once per bucket
    calls.clear()
    lin(x[:3])  # few rows: quant_linear, nothing timed
    assert not calls and len(timed) == 1
    y = x @ ref_w.T
    swiglu = torch.nn.functional.silu(y[:, :12]) * y[:, 12:]
    assert rel(lin(x, swiglu=True), swiglu) < 1e-5  # fc1: timed with SwiGLU (fused, or after cuBLAS), its own key
    assert len(timed) == 2 and timed[1].endswith("|swiglu")
    calls.clear()
    monkeypatch.setenv("GLMCHAT_4BIT_ROWS", "kernel")  # a benchmark's A/B
    lin(x)
    assert not calls


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_words_kernel_packed_products_equal_the_reference(fmt, monkeypatch):
    """The words kernel's products two at a time in fp16 (inline PTX, run by tests/ptx_emulator.py): 4-bit codes
    looked up in the register table (lut 3), int8 widened two at a time (cvt 3, compare's two int8 rows); one and
    two rows a program, with the norm, SwiGLU, the residual and a K tail of masked words."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import quant_words

    monkeypatch.setattr(quant_words, "usable", lambda *a, **k: True)  # (lut 3 asks for a GPU: the emulator stands in)
    n, k = 24, 200
    w, ref_w = random_weight(fmt, n, k, nested=False)
    g, res = (1 + 0.1 * torch.randn(k)).half(), torch.randn(2, n // 2).half()
    packed = dict(cvt=3) if fmt == "int8" else dict(lut=3)
    with interpreted_inline_ptx():
        for m, cfg in ((1, replace(WORDS1, **packed)), (2, replace(WORDS2, **packed)),
                       (1, replace(WORDS1, prefetch=True, **packed))):
            x = torch.randn(m, k).half()
            out = torch.full((m, n), float("nan"), dtype=torch.float16)
            quant_words.launch(x, w, out, None, None, None, 1e-5, False, cfg, False, out, out)
            assert rel(out, x.float() @ ref_w.T) < 5e-3, (m, cfg)
            out = torch.full((m, n // 2), float("nan"), dtype=torch.float16)
            quant_words.launch(x, w, out, None, res[:m], g, 1e-5, True, cfg, False, out, out)
            want = reference_norm_swiglu(x.float(), ref_w, g.float(), torch.zeros(n), res[:m].float())
            assert rel(out, want) < 5e-3, (m, cfg)


@pytest.mark.parametrize("fmt,dtype,divisor", [("nf4", torch.float16, 1.0), ("int4", torch.float16, 1.0),
                                               ("nf4", torch.float32, 2.0)])
def test_words_kernel_rotary_epilogue_equals_the_rotary_kernel_after_the_linear(fmt, dtype, divisor):
    """The QKV linear of a decode step with ``rope``: the words kernel rotates q and k and writes k and v into each
    row's slot after its prefix in its epilogue; the same q (left in the output's first H * D columns) and the same
    cache, bit for bit, as the plain kernel followed by the rotary kernel (fp16 with ChatGLM2's angle rounding, and
    32k's rope_ratio); one and two rows a program, an odd number of rows, the first K step peeled off, an idle row
    (position -1) that writes no key or value. A tile without the epilogue runs the rotary kernel after itself."""
    from backend.kernels import attention_batch as A

    H, G, D, S, K = 4, 2, 16, 40, 192
    N = (H + 2 * G) * D
    w, _ = random_weight(fmt, N, K, nested=True)
    bias, g = (torch.randn(N) * 0.1).to(dtype), (1 + 0.1 * torch.randn(K)).to(dtype)
    inv_freq = A.rotary_inv_freq(D // 2, "cpu").to(dtype).float()
    angle_dtype = dtype if dtype != torch.float32 else None
    for m, cfg in ((1, WORDS1), (2, WORDS2), (3, WORDS2), (1, replace(WORDS1, prefetch=True)), (2, WORDS_PAIRS),
                   (2, GEMV_LUT1)):
        x = torch.randn(m, K).to(dtype)
        pos, pre = torch.tensor([11, -1, 3][:m]), torch.tensor([5, 0, 2][:m])

        def cache():
            return torch.full((m, G, S, D), 7.0, dtype=dtype), torch.full((m, G, S, D), 7.0, dtype=dtype)

        kc, vc = cache()
        qkv = torch.empty(m, N, dtype=dtype)
        Q.quant_linear(x, w, bias, norm_weight=g, out=qkv, config=cfg)
        q_want = A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G, inv_freq=inv_freq,
                                    position_divisor=divisor, angle_dtype=angle_dtype)
        kf, vf = cache()
        rope = A.RopeWrite(kf, vf, pos, pre, H, G, inv_freq, divisor, angle_dtype)
        out = torch.full((m, N), float("nan"), dtype=dtype)
        q = Q.quant_linear(x, w, bias, norm_weight=g, out=out, config=cfg, rope=rope)
        assert q.shape == (m, H, D) and q.data_ptr() == out.data_ptr(), cfg
        assert torch.equal(q, q_want) and torch.equal(kf, kc) and torch.equal(vf, vc), (m, cfg)
        assert bool((kf[0, :, 16] != 7.0).all()), "row 0's key was not written to slot 5 + 11"
        if m > 1:
            assert bool((kf[1] == 7.0).all()) and bool((vf[1] == 7.0).all()), "the idle row wrote to its cache"
    with pytest.raises(ValueError, match="does not match a cache"):
        small = A.RopeWrite(kf[:, :1], vf[:, :1], pos, pre, H, 1, inv_freq)
        Q.quant_linear(x, w, bias, out=out, config=WORDS1, rope=small)
