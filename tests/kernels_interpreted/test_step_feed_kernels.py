"""A batched decode step's first launch (backend/kernels/step_feed.py) under Triton's interpreter, against its torch
fallback: sent from the host, the rows' tokens are embedded and nothing changes; fed, each row takes its pick, and a
running row moves on one position while an idle one stays at -1. Run through tests/test_kernels_batch.py."""

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

from backend.kernels import step_feed  # noqa: E402


def inputs(fed: int):
    torch.manual_seed(fed)
    embedding = torch.randn(50, step_feed.BLOCK + 300)  # a row in two programs, the second one partly masked
    tokens = torch.tensor([3, 9, 4, 0, 0])
    positions = torch.tensor([7, -1, 0, 12, 5])
    picks = torch.tensor([11, 12, 13, 49, 1])
    return torch.tensor([fed]), picks, tokens, positions, embedding


@pytest.mark.parametrize("fed", [0, 1])
def test_the_kernel_feeds_and_embeds_as_the_torch_fallback(fed, monkeypatch):
    rows = 4  # (the fifth row is past the bucket: untouched either way)
    flag, picks, tokens, positions, embedding = inputs(fed)
    out = torch.empty(rows, embedding.shape[1])
    step_feed.feed_and_embed(flag, picks, tokens, positions, embedding, out)

    monkeypatch.setattr(step_feed, "kernels_run", lambda x: False)
    flag_t, picks_t, tokens_t, positions_t, embedding_t = inputs(fed)
    want = step_feed.feed_and_embed(flag_t, picks_t, tokens_t, positions_t, embedding_t, torch.empty_like(out))

    assert torch.equal(out, want) and torch.equal(tokens, tokens_t) and torch.equal(positions, positions_t)
    if fed:
        assert tokens.tolist() == [11, 12, 13, 49, 0] and positions.tolist() == [8, -1, 1, 13, 5]
    else:
        assert tokens.tolist() == [3, 9, 4, 0, 0] and positions.tolist() == [7, -1, 0, 12, 5]
    assert torch.equal(out, embedding[tokens[:rows]]) and int(flag) == fed
