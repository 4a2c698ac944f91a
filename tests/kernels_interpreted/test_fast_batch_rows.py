"""The batched fast decoder under Triton's interpreter: many rows, sampled rows, dropped rows, next turns."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under Triton's interpreter via tests/test_kernels_batch.py"
)
pytest.importorskip("triton")

from backend.kernels.interpreter_compat import numpy_compat  # noqa: E402

numpy_compat()  # (each file runs in a subprocess of its own: tests/test_kernels_batch.py)

from backend.decode.eager import EagerBatchDecoder  # noqa: E402
from backend.decode.fast_batch import BatchFastDecoder  # noqa: E402
from backend.decode.protocol import DecodeRequest  # noqa: E402
from backend.service import SamplingParams  # noqa: E402
from tests.kernels_interpreted.decoder_models import GREEDY, make_model, run  # noqa: E402


def test_more_than_64_rows_as_evaluation_asks_step_together_each_as_alone():
    """Evaluation's decoder holds up to 256 short rows: 70 rows step in the 128 bucket, each equal to the eager
    decoder's row."""
    model, prefixes = make_model()
    params = SamplingParams(temperature=0.0, max_new_tokens=3)
    prompts = ([5, 7, 9, 11], [3, 4], [8, 8, 2, 6, 1, 30, 31])
    requests = [DecodeRequest(list(prompts[i % 3]), params, adapter=("ad", None)[i % 2]) for i in range(70)]
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=256, context_length=32, use_graphs=False)
    assert (decoder.max_batch, decoder.context_length) == (256, 32)
    buckets = []
    step = decoder._run_step
    decoder._run_step = lambda bucket: buckets.append(bucket) or step(bucket)
    fast = run(decoder, requests)
    assert set(buckets) == {128}
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=6), requests[:6])
    assert all(fast[i] == eager[i % 6] for i in range(70))


def test_sampled_rows_drawn_together_on_the_device_do_not_depend_on_the_batch():
    """Rows without a repetition penalty are sampled together (decode.batch_sampler), each with its own
    settings and seed: a seeded row gives the same reply beside greedy, sampled and penalised rows as alone, and
    another seed another reply."""
    model, prefixes = make_model()
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=8)
    requests = [
        DecodeRequest([5, 7, 9, 11], sampled, seed=3),
        DecodeRequest([3, 4], GREEDY, adapter="ad"),
        DecodeRequest([8, 8, 2], SamplingParams(temperature=1.2, top_k=7, max_new_tokens=8), adapter="ad", seed=4),
        DecodeRequest([6, 1, 30], SamplingParams(temperature=0.8, repetition_penalty=1.2, max_new_tokens=5), seed=5),
    ]
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False)
    together = run(decoder, requests, join_after=2)
    for i in (0, 2):
        assert together[i] == run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), requests[i:i + 1])[0]
    other = DecodeRequest([5, 7, 9, 11], sampled, seed=30)
    assert run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), [other])[0] != together[0]


def test_a_row_dropped_while_its_next_step_is_queued_gets_no_token_and_its_row_serves_a_new_request():
    """step() queues the next decode step before it returns; a row dropped before the next step() gets none of that
    step's tokens, and a request that takes its cache row meanwhile decodes as it would alone."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    long = SamplingParams(temperature=0.0, max_new_tokens=8)
    decoder.add(0, DecodeRequest([5, 7, 9, 11], long))
    decoder.add(1, DecodeRequest([3, 4], long, adapter="ad"))
    first = decoder.step()
    assert sorted(t.row for t in first) == [0, 1] and decoder._queued is not None
    slot = decoder._rows[0].slot
    decoder.drop(0)
    late = DecodeRequest([8, 8, 2, 6], GREEDY, adapter="ad")
    decoder.add(2, late)
    assert decoder._pending[0].slot == slot
    out = {1: [t.token for t in first if t.row == 1], 2: []}
    while decoder.rows:
        for t in decoder.step():
            assert t.row != 0
            out[t.row].append(t.token)
    alone = {r: run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), [req])[0]
             for r, req in ((1, DecodeRequest([3, 4], long, adapter="ad")), (2, late))}
    assert out == alone


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
