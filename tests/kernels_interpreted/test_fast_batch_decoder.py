"""The batched fast decoder (backend/decode/fast_batch.py) against the eager batched decoder, on a tiny
float32 model, with its Triton attention and rotary kernels running under Triton's interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.decode.eager import EagerBatchDecoder
from backend.decode.fast_batch import BatchFastDecoder
from backend.decode.protocol import DecodeRequest
from backend.modeling import ChatGLMForConditionalGeneration, split_prefix
from backend.service import SamplingParams
from tests.helpers_tiny import tiny_config

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def make_model():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(tiny_config(96, kv_channels=16)).eval()
    prefix = [t[:1] for t in split_prefix(torch.randn(1, 3, 2 * 2 * 2 * 16) * 0.5, model.config)]
    return model, {None: None, "ad": prefix}


def run(decoder, requests, join_after: int = 0):
    """Tokens per row; the last request joins after ``join_after`` steps (continuous batching)."""
    out = {i: [] for i in range(len(requests))}
    first = requests if not join_after else requests[:-1]
    for i, r in enumerate(first):
        decoder.add(i, r)
    steps = 0
    while decoder.rows:
        for t in decoder.step():
            out[t.row].append(t.token)
        steps += 1
        if join_after and steps == join_after:
            decoder.add(len(requests) - 1, requests[-1])
    assert not decoder.failed()
    return out


def test_greedy_rows_equal_the_eager_decoder_with_adapters_and_a_row_joining_late():
    model, prefixes = make_model()
    requests = [
        DecodeRequest([5, 7, 9, 11], GREEDY),
        DecodeRequest([3, 4], GREEDY, adapter="ad"),
        DecodeRequest([8, 8, 2, 6, 1, 30, 31], GREEDY, stop_token_ids=frozenset({2})),
    ]
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=4), requests, join_after=2)
    fast = run(BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False), requests, join_after=2)
    assert fast == eager
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), requests[1:2])
    assert alone[0] == fast[1]


def test_a_next_turn_reuses_the_parked_row_and_gives_the_same_tokens():
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    first = run(decoder, [DecodeRequest([5, 7, 9], GREEDY, adapter="ad")])[0]
    follow = [5, 7, 9] + first + [12, 13]
    fed = []
    prefill = decoder._prefill
    decoder._prefill = lambda rows: fed.extend(len(r.tokens) - r.cached for r in rows) or prefill(rows)
    reused = run(decoder, [DecodeRequest(follow, GREEDY, adapter="ad")])[0]
    assert fed == [3]  # the first turn's last token (picked, never fed) and the two new ones
    assert decoder._parked  # the row was parked again after the second turn
    fresh = run(BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False),
                [DecodeRequest(follow, GREEDY, adapter="ad")])[0]
    assert reused == fresh
