"""decode.prompt_graphs: which graphs a decoder's warm-up captures, checked with a stand-in for the capture."""

from types import SimpleNamespace

import pytest
import torch

from backend.decode import prompt_graphs
from backend.decode.prompt_graphs import MAX_WINDOW, TOKEN_BUCKETS, PromptGraphs


class _Graph:
    def replay(self):
        pass


def _graphs(slots: int) -> tuple[PromptGraphs, list]:
    calls = []
    math = lambda inputs, batch, tokens, window: calls.append((tokens, window)) or torch.zeros(1, 4)  # noqa: E731
    graphs = PromptGraphs(math, torch.device("cpu"), pool=None, slots=slots, capture=True)
    graphs._capture = lambda run: (_Graph(), run())  # the math runs once, as a capture would record it
    return graphs, calls


@pytest.mark.parametrize("slots", [640, 1024, 32896])
def test_warm_up_captures_every_key_a_prompt_can_reach(slots):
    graphs, calls = _graphs(slots)
    graphs.capture_all()
    windows = sorted({min(w, slots) for w in (256, 512, 1024, 2048)})
    assert sorted(graphs._graphs) == sorted((t, w) for t in TOKEN_BUCKETS for w in windows)
    captured = len(calls)
    # any one-row prompt the graphs take afterwards replays a captured graph: no capture in a first token
    for width in (1, 200, 300, 700, 1000, 1500, 2000):
        for n in (1, 17, 64, 128):
            row = SimpleNamespace(slot=3, prefix_len=0, cached=max(0, width - n), tokens=list(range(width)))
            if graphs.takes([row], [row.tokens[row.cached:]]):
                graphs.logits(row, row.tokens[row.cached:])
    assert len(calls) == captured


def test_a_failed_capture_turns_graphs_off_and_answers_eagerly(monkeypatch):
    graphs, calls = _graphs(4096)

    def fail(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs._capture = fail
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        graphs.capture_all()
    assert graphs.off and calls == [(TOKEN_BUCKETS[0], 256)]  # answered eagerly once, then stopped trying
    row = SimpleNamespace(slot=0, prefix_len=0, cached=0, tokens=[1, 2, 3])
    assert not graphs.takes([row], [row.tokens])


def test_wide_rows_stay_eager():
    graphs, _ = _graphs(32896)
    row = SimpleNamespace(slot=0, prefix_len=128, cached=MAX_WINDOW, tokens=list(range(MAX_WINDOW + 10)))
    assert not graphs.takes([row], [row.tokens[row.cached:]])
    assert prompt_graphs.WINDOWS[-1] == MAX_WINDOW
