"""The GEMVs' L2 prefetch (backend/kernels/l2_prefetch.py) asks for exactly the bytes each kernel reads: every
program's ranges lie inside its weight (and NF4 block scales) and together cover all of it, for the one-row int8
GEMV (plain rows in pairs, SwiGLU's two halves, a last program with fewer rows) and the words kernel (NF4 with
nested block scales, SwiGLU, a tail of rows). The prefetch itself is inline PTX, which the interpreter cannot
run, so the kernels' calls to it are recorded instead. Run through tests/test_kernels_batch.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()

from backend.int8_linear import LinearWeights, quantize_per_channel  # noqa: E402
from backend.kernels import gemv_4bit as Q  # noqa: E402
from backend.kernels import int8_gemv as G  # noqa: E402
from backend.kernels import l2_prefetch  # noqa: E402
from backend.kernels import quant_words as W  # noqa: E402


def _int(v) -> int:
    return int(np.asarray(v.handle.data).reshape(-1)[0]) if hasattr(v, "handle") else int(v)


@pytest.fixture
def asked(monkeypatch):
    """The byte ranges [start, end) the kernels ask L2 for, as absolute addresses."""
    ranges = []

    def record(ptr, start, count, lines):
        if _int(count) > 0:
            ranges.append((_int(ptr) + _int(start), _int(ptr) + _int(start) + _int(count)))

    monkeypatch.setattr(l2_prefetch, "wanted", lambda device: True)
    monkeypatch.setattr(G, "prefetch_bytes", record)
    monkeypatch.setattr(W, "prefetch_bytes", record)
    return ranges


def covered(ranges, t: torch.Tensor) -> list:
    """The ranges that fall in t's bytes, checked to cover all of them; ranges elsewhere are returned apart."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    inside = sorted((a, b) for a, b in ranges if lo <= a < hi)
    assert inside and all(b <= hi for _, b in inside), "a range runs past the tensor"
    at = lo
    for a, b in inside:
        assert a <= at, f"bytes {at - lo}..{a - lo} of the tensor were never asked for"
        at = max(at, b)
    assert at == hi, f"the last {hi - at} bytes were never asked for"
    return [r for r in ranges if not lo <= r[0] < hi]


@pytest.mark.parametrize("n,swiglu", [(48, False), (50, False), (48, True)])
def test_one_row_int8_gemv_asks_for_its_whole_weight(asked, n, swiglu):
    torch.manual_seed(n)
    q, scale = quantize_per_channel(torch.randn(n, 64) * 0.05)
    lw = LinearWeights(q, scale, None)
    out = torch.empty(n // 2 if swiglu else n)
    G.gemv(torch.randn(64), lw, out, swiglu=swiglu, config=G.GemvConfig(block_p=4, block_k=64))
    assert covered(asked, q) == []


# whole blocks a row (nested scales), and blocks across rows (K = 216: float32 scales; two rows a program, so
# programs start and end inside blocks, a block of scales shared by two programs)
@pytest.mark.parametrize("n,k,swiglu", [(24, 128, False), (20, 128, True), (20, 216, False), (20, 216, True)])
def test_words_gemv_asks_for_its_nf4_weight_and_block_scales(asked, n, k, swiglu):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    data, state = bnbf.quantize_4bit(torch.randn(n, k) * 0.02, blocksize=64, quant_type="nf4",
                                     compress_statistics=k % 64 == 0)
    w = Q.nf4_weight(data, state)
    x = torch.randn(1, k)
    Q.quant_linear(x, w, swiglu=swiglu, config=Q.QuantLinearConfig("words", block_n=2, block_k=64, block_m=1, lut=1))
    rest = covered(asked, w.data)
    assert covered(rest, w.absmax) == []
