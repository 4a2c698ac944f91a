"""``kernels.tuning.pick`` keeps a candidate only when its output is the default's, rounding apart: the timing
is the card's, and a kernel a compiler version or card gets wrong must not win because it is fast."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from backend.kernels import tuning


@dataclass(frozen=True)
class Tile:
    name: str


REFERENCE = torch.linspace(1, 2, 64)
OUTPUTS = {
    "default": REFERENCE,
    "rounded": REFERENCE + 1e-3,  # another summation order: agrees
    "wrong": REFERENCE.flip(0),  # a kernel reading the wrong columns
    "nan": REFERENCE * float("nan"),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_loaded", {})
    return tmp_path


def _pick(names, costs, outputs=OUTPUTS):
    current = {}

    def run(tile):
        current["tile"] = tile
        out = outputs[tile.name]
        return None if out is None else out.clone()

    def timer(fn):
        fn()
        return costs[current["tile"].name]

    return tuning.pick("k|N64", [Tile(n) for n in names], run, torch.device("cpu"), timer=timer)


def test_the_fastest_candidate_that_agrees_with_the_default_is_picked(cache):
    costs = {"default": 3.0, "rounded": 2.0, "wrong": 1.0, "nan": 0.5}
    with pytest.warns(UserWarning, match=r"2 of 4 configs compute a different result.*wrong.*nan"):
        assert _pick(["default", "wrong", "nan", "rounded"], costs) == Tile("rounded")
    with pytest.warns(UserWarning, match="different result"):  # the slow default stays if nothing else agrees
        assert _pick(["default", "wrong"], {"default": 3.0, "wrong": 1.0}) == Tile("default")


def test_a_reference_that_is_not_finite_judges_nothing(cache):
    outputs = {"default": OUTPUTS["nan"], "wrong": OUTPUTS["wrong"]}
    assert _pick(["default", "wrong"], {"default": 3.0, "wrong": 1.0}, outputs) == Tile("wrong")


def test_runs_that_return_nothing_are_timed_only(cache):
    outputs = {"default": None, "wrong": None}
    assert _pick(["default", "wrong"], {"default": 3.0, "wrong": 1.0}, outputs) == Tile("wrong")


def test_agreement_is_relative_to_the_reference_norm():
    big = torch.full((8,), 1e4)
    assert tuning.agrees(big + 100, big) and not tuning.agrees(big + 300, big)
    assert not tuning.agrees(torch.zeros(7), torch.zeros(8))  # another shape
    assert tuning.difference(OUTPUTS["nan"], REFERENCE) == float("inf")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graphs")
def test_the_timer_measures_the_kernel_not_its_launch_from_python():
    """A call whose host side takes 2 ms around a kernel of microseconds: do_bench would report the 2 ms."""
    import time

    x = torch.randn(1 << 20, device="cuda")

    def slow_to_launch():
        time.sleep(0.002)
        x.mul_(1.0)

    assert tuning.cuda_timer(slow_to_launch) < 0.5
