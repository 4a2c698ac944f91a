"""Tiles tuned inside a captured decode step (backend/decode/step_tuning.py), on a cost model: the descent finds each
kind's fastest tile, keeps the start within the noise margin, skips a tile that fails on the card or computes
another step; winners are stored with the candidates' digest, and a step whose kinds all kept their start is
remembered as tuned."""

from __future__ import annotations

import itertools

import pytest
import torch

from backend.decode import step_tuning as S
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
