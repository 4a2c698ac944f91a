"""Compare's two rows (bucket 2) with each int8 linear's kernel tuned inside the two-row step
(backend/decode/two_row_tuning.py), under Triton's interpreter. Run through tests/test_kernels_batch.py."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()  # (each file runs in a subprocess of its own: tests/test_kernels_batch.py)

from backend.decode import two_row_tuning as R  # noqa: E402
from backend.decode.batch_linear import BatchLinear  # noqa: E402
from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402
from backend.decode.protocol import DecodeRequest  # noqa: E402
from backend.kernels import gemv_rows  # noqa: E402
from backend.kernels.gemv_rows import RowsGemvConfig  # noqa: E402
from backend.service import SamplingParams  # noqa: E402
from tests.kernels_interpreted.decoder_models import int8_model, run  # noqa: E402


def test_two_int8_rows_run_the_tile_tuned_for_them_or_the_matmul_path(monkeypatch):
    """A linear's ``two_rows`` tile decides two rows' kernel (any other row count keeps the pick made alone):
    gemv_rows with exactly that tile, or for OTHER the matmul path; all give the dequantised product with RMSNorm
    and the residual."""
    from backend.int8_layer import Int8Linear

    torch.manual_seed(1)
    layer = Int8Linear(96, 40, True, torch.float32)
    layer.quantize_from(torch.randn(40, 96) * 0.05)
    layer.bias.data.normal_()
    lin = BatchLinear(layer, torch.float32, "qkv")
    x, g, res = torch.randn(2, 96), 1 + torch.rand(96), torch.randn(2, 40)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    want = xn @ (layer.weight.float() * layer.scale[:, None]).T + layer.bias + res
    seen = []
    real = gemv_rows.gemv_rows
    monkeypatch.setattr(gemv_rows, "gemv_rows", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
    for tile in (RowsGemvConfig(4, 64, kernel="words"), RowsGemvConfig(8, 128, cvt=0), R.OTHER):
        lin.two_rows = tile
        seen.clear()
        out = lin(x, norm=g, residual=res.clone())
        assert torch.allclose(out, want, atol=1e-4), tile
        assert seen == ([] if tile == R.OTHER else [tile])
        seen.clear()
        lin(torch.randn(3, 96), norm=g)  # three rows: not this tile
        assert seen and seen[0] != tile


def test_tuning_the_two_row_step_runs_every_candidate_to_the_same_step_and_keeps_the_winner(monkeypatch, tmp_path):
    """BatchFastDecoder.tune_two_rows with the step run (not timed) for each candidate: every tile gives the starting
    logits, the fastest (by a cost model) is kept for its kind, stored for this device and applied by the next
    decoder; rows 0 and 1 are left idle, and a compare after it gives the eager decoder's tokens."""
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    model, prefixes = int8_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    candidates = R.candidates_for(decoder)
    assert list(candidates) == list(R.KINDS)
    fast_fc2 = candidates["fc2"][6]  # a words tile
    logits_seen = []

    def measure(configs):
        R.apply(decoder, configs)
        logits_seen.append(decoder._step_math(2)[0].clone())
        cost = 1.0 - 0.01 * (configs["fc2"] == fast_fc2) - 0.01 * (configs["qkv"] == R.OTHER)
        return lambda: cost

    decoder.tune_two_rows(measure)
    assert len(logits_seen) == 1 + sum(len(c) for c in candidates.values())
    assert all(torch.allclose(x, logits_seen[0], rtol=1e-4, atol=1e-4) for x in logits_seen)
    assert all(lw.down.two_rows == fast_fc2 and lw.qkv.two_rows == R.OTHER and lw.up.two_rows is None
               for lw in decoder.layers)
    assert decoder.positions[:2].tolist() == [-1, -1] and not decoder._parked
    again = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    assert again.layers[0].down.two_rows is None  # (CPU: no card's tuning applied at construction)
    assert R.cached(again) == {"fc2": fast_fc2, "qkv": R.OTHER}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    requests = [DecodeRequest([5, 7, 9, 11], greedy, adapter="ad"), DecodeRequest([6, 1, 30], greedy)]
    assert run(decoder, requests) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), requests)
