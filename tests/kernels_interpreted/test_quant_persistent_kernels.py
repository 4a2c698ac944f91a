"""The persistent one-row 4-bit GEMV (backend/kernels/quant_persistent.py) under Triton's CPU interpreter, against
torch float32 math on weights unpacked independently of the kernels (bitsandbytes' dequantize_4bit, the int4
release's packing rule). Run through tests/test_kernels_batch.py; outputs are poisoned first.

The interpreter runs two multiprocessors' worth of programs, so with a few programs each every program loops over
several blocks, the last of them partial or past the end."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
triton = pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.kernels import quant_persistent as P  # noqa: E402
from test_quant_linear_kernels import random_weight, reference_norm_swiglu, rel  # noqa: E402

TABLE = Q.QuantLinearConfig("persistent", block_n=4, block_k=0, block_m=1, num_warps=4, lut=1, programs_per_sm=2)
PACKED = replace(TABLE, lut=3)


@pytest.mark.parametrize("fmt,n,k,nested", [("nf4", 24, 192, True), ("nf4", 22, 320, False), ("int4", 26, 224, False),
                                            ("nf4", 40, 256, True)])
def test_one_row_with_bias_norm_swiglu_and_residual_equals_the_reference(fmt, n, k, nested):
    """Plain with a bias; then fc1's form (the norm, SwiGLU's halves, a residual); K with a tail of padding words
    (192: 6 groups of 4 words in a tile of 8; 320: 10 in 16), N not a multiple of the block, blocks per program 2-4."""
    w, ref_w = random_weight(fmt, n, k, nested)
    x, bias, g = torch.randn(1, k), torch.randn(n) * 0.1, 1 + 0.1 * torch.randn(k)
    for cfg in (TABLE, replace(TABLE, block_n=2, programs_per_sm=1), replace(TABLE, block_n=8, num_warps=8)):
        out = torch.full((1, n), float("nan"))
        Q.quant_linear(x, w, bias, out=out, config=cfg)
        assert rel(out, x @ ref_w.T + bias) < 1e-5, cfg
        res = torch.randn(1, n // 2)
        out = torch.full((1, n // 2), float("nan"))
        Q.quant_linear(x, w, residual=res, norm_weight=g, swiglu=True, out=out, config=cfg)
        assert rel(out, reference_norm_swiglu(x, ref_w, g, torch.zeros(n), res)) < 1e-5, cfg


def test_the_residual_in_place_as_dense_and_fc2_write_it():
    w, ref_w = random_weight("nf4", 20, 192, True)
    x, hidden = torch.randn(1, 192), torch.randn(1, 20)
    want = hidden + x @ ref_w.T
    Q.quant_linear(x, w, residual=hidden, out=hidden, config=TABLE)
    assert rel(hidden, want) < 1e-5


@pytest.mark.parametrize("fmt,lut", [("nf4", 3), ("int4", 3), ("nf4", 4), ("int4", 4)])
def test_packed_products_equal_the_reference(fmt, lut, monkeypatch):
    """The register table (lut 3) or the shared byte-pair table (lut 4) and products two at a time in fp16 (inline
    PTX, run by tests/ptx_emulator.py), with the norm weight's product rounded once, SwiGLU and a residual, and a K
    tail of masked words."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import quant_words

    monkeypatch.setattr(quant_words, "usable", lambda *a, **k: True)  # (lut 3 asks for a GPU: the emulator stands in)
    n, k = 26, 320 if fmt == "nf4" else 224
    w, ref_w = random_weight(fmt, n, k, nested=False)
    x, g, res = torch.randn(1, k).half(), (1 + 0.1 * torch.randn(k)).half(), torch.randn(1, n // 2).half()
    with interpreted_inline_ptx():
        out = torch.full((1, n), float("nan"), dtype=torch.float16)
        P.launch(x, w, out, None, None, None, 1e-5, False, replace(PACKED, lut=lut), False, out)
        assert rel(out, x.float() @ ref_w.T) < 5e-3
        out = torch.full((1, n // 2), float("nan"), dtype=torch.float16)
        P.launch(x, w, out, None, res, g, 1e-5, True, replace(PACKED, lut=lut), False, out)
        want = reference_norm_swiglu(x.float(), ref_w, g.float(), torch.zeros(n), res.float())
        assert rel(out, want) < 5e-3


@pytest.mark.parametrize("fmt,lut", [("nf4", 4), ("int4", 3)])
def test_two_rows_share_the_looked_up_weights_and_each_gets_its_own_norm(fmt, lut, monkeypatch):
    """Compare's two rows in one pass (packed products, run by tests/ptx_emulator.py): rows of different scale (each
    its own RMSNorm factor), a bias, SwiGLU with a residual, strided rows; each equals the reference."""
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import quant_words

    monkeypatch.setattr(quant_words, "usable", lambda *a, **k: True)
    n, k = 26, 320 if fmt == "nf4" else 224
    w, ref_w = random_weight(fmt, n, k, nested=True)
    wide = torch.randn(2, k + 32).half()
    x = wide[:, :k]  # rows at a stride of k + 32
    x[1] *= 4
    g, res, bias = (1 + 0.1 * torch.randn(k)).half(), torch.randn(2, n // 2).half(), (0.1 * torch.randn(n)).half()
    cfg = replace(PACKED, lut=lut, block_m=2)
    with interpreted_inline_ptx():
        out = torch.full((2, n), float("nan"), dtype=torch.float16)
        P.launch(x, w, out, bias, None, None, 1e-5, False, cfg, False, out)
        for m in range(2):
            assert rel(out[m], x[m].float() @ ref_w.T + bias.float()) < 5e-3, m
        out = torch.full((2, n // 2), float("nan"), dtype=torch.float16)
        P.launch(x, w, out, None, res, g, 1e-5, True, cfg, False, out)
        want = reference_norm_swiglu(x.float(), ref_w, g.float(), torch.zeros(n), res.float())
        for m in range(2):
            assert rel(out[m], want[m]) < 5e-3, m


def test_what_it_cannot_take_is_refused_and_a_tuned_pick_falls_back():
    """Two rows, int8, or the byte-pair table: refused with a sentence; quant_linear, given a tuned persistent pick
    for a call the kernel cannot read, takes the default kernel instead (``_usable``)."""
    w, ref_w = random_weight("nf4", 8, 192, True)
    assert not P.usable(torch.randn(2, 192), w, None, 1)  # two rows: packed products only
    assert not P.usable(torch.randn(3, 192), w, None, 3)
    assert not P.usable(torch.randn(1, 192), random_weight("int8", 8, 192, False)[0], None, 1)
    assert not P.usable(torch.randn(1, 192), w, None, 2)
    with pytest.raises(ValueError, match="one row"):
        P.launch(torch.randn(2, 192), w, torch.empty(2, 8), None, None, None, 1e-5, False, TABLE, False, w.code)
    x = torch.randn(2, 192)
    assert not Q._usable(TABLE, x, w, None)
    assert Q._usable(TABLE, x[:1], w, None)


def test_blocks_asked_of_l2_ahead_are_the_blocks_the_programs_read_next(monkeypatch):
    """``l2_ahead`` (kernels/weight_prefetch.py; the ranges recorded by tests/ptx_emulator.py): fc1's form (SwiGLU,
    a K tail of padding words), two programs of four blocks each, two blocks ahead. The output is bit for bit the
    one without prefetches. A program asks, before its loop, for the two blocks after its first, then in each
    iteration for the block three on, and nothing past the last block; each block is exactly four ranges: its rows'
    words (the gate half, then the up half) and those rows' absmax (each 16-byte aligned, a multiple of 16 bytes)."""
    import ptx_emulator
    from ptx_emulator import interpreted_inline_ptx

    from backend.kernels import quant_words

    monkeypatch.setattr(quant_words, "usable", lambda *a, **k: True)
    n, k, block_n = 64, 320, 4  # 32 outputs: 8 blocks over 2 programs (the interpreter's 2 multiprocessors)
    w, _ = random_weight("nf4", n, k, nested=False)
    x = torch.randn(1, k).half()
    cfg = replace(PACKED, lut=4, block_n=block_n, programs_per_sm=1)
    outs = []
    with interpreted_inline_ptx():
        for ahead in (0, 2):
            ptx_emulator.PREFETCHED.clear()
            out = torch.full((1, n // 2), float("nan"), dtype=torch.float16)
            P.launch(x, w, out, None, None, None, 1e-5, True, replace(cfg, l2_ahead=ahead), False, out)
            outs.append(out)
    assert torch.equal(outs[0], outs[1])
    row_bytes, absmax_row = k // 2, k // w.blocksize * 4  # (float32 absmax: 5 a row, 20 bytes)
    words, absmax = w.data.data_ptr(), w.absmax.data_ptr()
    want = []
    for block in [2, 4, 6] + [3, 5, 7]:  # program 0 (blocks 0, 2, 4, 6), then program 1
        first = block * block_n
        want += [(words + first * row_bytes, block_n * row_bytes), (words + (n // 2 + first) * row_bytes,
                                                                    block_n * row_bytes),
                 (absmax + first * absmax_row, block_n * absmax_row),
                 (absmax + (n // 2 + first) * absmax_row, block_n * absmax_row)]
    assert ptx_emulator.PREFETCHED == want
