"""Tiles tuned inside a captured decode step (backend/decode/step_tuning.py), on a cost model: the descent finds each
kind's fastest tile, keeps the start within the noise margin, skips a tile that fails on the card or computes
another step; winners are stored with the candidates' digest, and a step whose kinds all kept their start is
remembered as tuned. Compare's two-row step (backend/decode/two_row_tuning.py): its kinds and candidates by weights."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from backend.decode import step_tuning as S
from backend.decode import two_row_tuning as R
from backend.kernels.gemv_4bit import QuantLinearConfig
from backend.kernels.gemv_rows import RowsGemvConfig
from backend.kernels.int8_gemv import GemvConfig


def _measure(costs: dict, failing=(), noise=0.0):
    """A step whose time is the sum of its tiles' costs (with alternating noise); ``failing`` tiles do not build."""
    flip = itertools.cycle((noise, -noise))

    def measure(configs):
        if any(c in failing for c in configs.values()):
            raise RuntimeError("out of resources: shared memory")
        total = sum(costs[k].get(c, 1.0) for k, c in configs.items())
        return lambda: total * (1 + next(flip))
    return measure


def test_the_descent_keeps_each_kinds_fastest_tile_and_skips_tiles_that_fail():
    a, b, c = GemvConfig(block_p=2), GemvConfig(block_p=4), GemvConfig(block_p=8)
    start = {"fc1": a, "qkv": a}
    costs = {"fc1": {a: 1.0, b: 0.8, c: 0.9}, "qkv": {a: 0.5, b: 0.3, c: 0.4}}
    best = S.descend(start, {"fc1": [b, c], "qkv": [c, b]}, _measure(costs), rounds=3)
    assert best == {"fc1": b, "qkv": b}
    measure = _measure(costs, failing=(b,))
    assert S.descend(start, {"fc1": [b, c], "qkv": [c, b]}, measure) == {"fc1": c, "qkv": c}


def test_a_tile_within_the_noise_margin_does_not_replace_the_start():
    a, b = GemvConfig(block_p=2), GemvConfig(block_p=4)
    costs = {"fc2": {a: 1.0, b: 0.999}}  # 0.1% faster: below KEEP_GAIN
    assert S.descend({"fc2": a}, {"fc2": [b]}, _measure(costs, noise=0.0005)) == {"fc2": a}


def test_a_faster_tile_whose_step_is_wrong_is_not_kept(caplog):
    a, b, c = GemvConfig(block_p=2), GemvConfig(block_p=4), GemvConfig(block_p=8)
    timed = _measure({"fc1": {a: 1.0, b: 0.5, c: 0.8}})

    def measure(configs):
        if configs["fc1"] == b:  # what graph_timer raises when the step's logits are off the start's
            raise S.WrongResult("logits off the default tiles' by 1.4")
        return timed(configs)

    with caplog.at_level("WARNING", logger="glmchat.tuning"):
        assert S.descend({"fc1": a}, {"fc1": [b, c]}, measure) == {"fc1": c}
    assert "computes a different step" in caplog.text and "off the default tiles' by 1.4" in caplog.text


def test_each_step_is_checked_against_the_first_steps_logits():
    reference = []
    logits = torch.linspace(-3, 3, 100)
    S.check_step(reference, logits)  # the starting tiles' step: the reference
    S.check_step(reference, logits * 1.01)  # another summation order: within STEP_AGREEMENT
    with pytest.raises(S.WrongResult, match="off the default tiles' by 2"):
        S.check_step(reference, -logits)
    with pytest.raises(S.WrongResult, match="inf"):
        S.check_step(reference, logits * float("nan"))


def _tiles(candidates, applied: dict) -> S.StepTiles:
    return S.StepTiles("test", "test_step:shape", dict.fromkeys(candidates), candidates, applied.update,
                       lambda kind, fields: RowsGemvConfig(**fields))


def test_a_step_whose_kinds_all_kept_their_start_is_stored_as_tuned_and_new_candidates_tune_again(monkeypatch, tmp_path):
    """Every kind keeping its start (None: the pick made alone) is a result too: read back as {} (tuned, nothing
    to apply), not None (tune again at every start). A changed candidate list tunes again."""
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    candidates, applied = {"fc1": [RowsGemvConfig(4, 512)]}, {}
    assert S.cached(_tiles(candidates, applied), cpu) is None
    assert S.tune(_tiles(candidates, applied), cpu, lambda configs: lambda: 1.0) == {"fc1": None}
    assert applied == {"fc1": None} and S.cached(_tiles(candidates, {}), cpu) == {}
    faster = RowsGemvConfig(2, 1024)
    more = {"fc1": [RowsGemvConfig(4, 512), faster]}
    assert S.cached(_tiles(more, {}), cpu) is None
    S.tune(_tiles(more, applied), cpu, lambda configs: lambda: 0.5 if configs["fc1"] == faster else 1.0)
    assert applied == {"fc1": faster} and S.cached(_tiles(more, {}), cpu) == {"fc1": faster}


def _decoder(weights: str, dtype=torch.float16, rows_gemv=True):
    """A decoder's linears as the two-row tuner sees them: int8, NF4 or 16-bit layers, a 16-bit output layer."""
    def lin(n, k):
        if weights == "float":
            q = None
        else:
            q = types.SimpleNamespace(fmt=weights, n=n, k=k, table_registers={torch.bfloat16: (0,) * 8})
        return types.SimpleNamespace(q=q, rows_gemv=rows_gemv, two_rows=None, one_row=types.SimpleNamespace(
            weight=torch.empty(n, k)) if weights != "nf4" else None)

    layer = types.SimpleNamespace(qkv=lin(48, 32), dense=lin(32, 32), up=lin(128, 32), down=lin(32, 64))
    output = types.SimpleNamespace(q=None, one_row=types.SimpleNamespace(weight=torch.empty(100, 32)), two_rows=None)
    return types.SimpleNamespace(layers=[layer, layer], output=output, dtype=dtype, device=torch.device("cpu"))


def test_two_int8_rows_are_tuned_among_gemv_rows_tiles_and_the_matmul_path():
    """Each int8 kind's candidates: gemv_rows' (packed fp16 products for fp16 rows only), then the matmul path; the
    output layer (16-bit) is not a kind; every kind starts from its pick made alone."""
    from backend.kernels import gemv_rows

    cands = R.candidates_for(_decoder("int8"))
    assert list(cands) == ["fc1", "fc2", "qkv", "dense"]
    assert cands["fc1"] == gemv_rows.candidate_configs(True) + [R.OTHER]
    assert cands["qkv"] == gemv_rows.candidate_configs(False) + [R.OTHER]
    bf16 = R.candidates_for(_decoder("int8", torch.bfloat16))["qkv"]
    assert R.OTHER in bf16 and not any(c.kernel == "words" and c.cvt == 3 for c in bf16)
    tiles = R.step_tiles(_decoder("int8"))
    assert tiles.start == dict.fromkeys(R.KINDS) and tiles.key.startswith("two_row_step:int8-float:float16:2x48x32")
    assert R.candidates_for(_decoder("int8", rows_gemv=False)) == {}  # GLMCHAT_ROWS_GEMV=0: the matmul path only


def test_two_4bit_rows_are_tuned_among_quant_linears_two_row_words_tiles_and_16_bit_models_not_at_all():
    from backend.kernels import packed_products

    cands = R.candidates_for(_decoder("nf4", torch.bfloat16))
    assert list(cands) == ["fc1", "fc2", "qkv", "dense"]
    for kind, tiles in cands.items():
        assert tiles and all(isinstance(c, QuantLinearConfig) and c.kernel == "words" and c.block_m == 2 for c in tiles)
        assert any(c.lut == 3 for c in tiles) == packed_products.tried()
    assert not any(c.lut == 3 for c in R.candidates_for(_decoder("nf4", torch.float32))["qkv"])  # no fp32 table
    assert not R.applies(_decoder("float")) and R.applies(_decoder("nf4"))


def test_the_two_row_winners_go_to_every_linear_of_their_kind_and_read_back_as_their_config_class(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    decoder = _decoder("int8")
    dense_words = R.candidates_for(decoder)["dense"][6]

    def measure(configs):
        total = 1.0 - 0.1 * (configs["qkv"] == R.OTHER) - 0.1 * (configs["dense"] == dense_words)
        return lambda: total

    best = R.tune(decoder, measure)
    assert best == {"fc1": None, "fc2": None, "qkv": R.OTHER, "dense": dense_words}
    assert all(lw.qkv.two_rows == R.OTHER and lw.dense.two_rows == dense_words for lw in decoder.layers)
    again = _decoder("int8")
    R.apply(again, R.cached(again))
    assert again.layers[1].dense.two_rows == dense_words and again.layers[0].up.two_rows is None
    nf4 = _decoder("nf4", torch.bfloat16)
    words = R.candidates_for(nf4)["fc2"][-1]
    R.tune(nf4, lambda configs: lambda: 0.5 if configs["fc2"] == words else 1.0)
    assert R.cached(_decoder("nf4", torch.bfloat16)) == {"fc2": words}
