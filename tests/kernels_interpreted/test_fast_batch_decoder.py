"""The batched fast decoder (backend/decode/fast_batch.py) against the eager batched decoder, on a tiny
float32 model, with its Triton kernels running under Triton's interpreter: rows, adapters and prompts."""

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


def test_greedy_rows_equal_the_eager_decoder_with_adapters_and_a_row_joining_late():
    model, prefixes = make_model()
    requests = [
        DecodeRequest([5, 7, 9, 11], GREEDY),
        DecodeRequest([3, 4], GREEDY, adapter="ad"),
        DecodeRequest([8, 8, 2, 6, 1, 30, 31], GREEDY, stop_token_ids=frozenset({2})),
    ]
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=4), requests, join_after=2)
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False)
    decoder.warm_up()  # its two-row prompt leaves nothing behind
    assert decoder.rows == 0 and not decoder._parked
    fast = run(decoder, requests, join_after=2)
    assert fast == eager
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), requests[1:2])
    assert alone[0] == fast[1]


SHORT = SamplingParams(temperature=0.0, max_new_tokens=3)


def graphed_decoder(monkeypatch, max_batch: int):
    """(model, prefixes, a decoder whose one-row prompts run padded as in their graphs, eagerly, with small token
    buckets, and the list of each such prompt's fed tokens)."""
    from backend.decode import prompt_graphs

    monkeypatch.setattr(prompt_graphs, "TOKEN_BUCKETS", (4, 8))  # small buckets: the interpreter is slow
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=max_batch, use_graphs=False, prompt_graphs=True)
    fed = []
    logits = decoder._prompt_graphs.logits
    decoder._prompt_graphs.logits = lambda row, new: fed.append(len(new)) or logits(row, new)
    return model, prefixes, decoder, fed

def test_one_row_prompts_padded_as_in_their_graphs_give_the_eager_tokens(monkeypatch):
    """A one-row prompt replays a CUDA graph padded to a token bucket and a key window (decode.prompt_graphs); run
    eagerly with the same padding here: a first turn, an adapter's prompt after its prefix slots, a next turn fed
    into a parked row and a prompt past the largest bucket give the eager decoder's tokens."""
    from backend.decode import prompt_graphs

    model, prefixes, decoder, padded = graphed_decoder(monkeypatch, max_batch=2)
    TOKEN_BUCKETS = prompt_graphs.TOKEN_BUCKETS
    first = DecodeRequest([5, 7, 9, 11, 40, 41, 42], SHORT)
    requests = [first]
    fast = [run(decoder, [first])[0]]
    requests.append(DecodeRequest(first.prompt_ids + fast[0] + [12, 13], SHORT))  # the next turn
    requests += [DecodeRequest([3, 4], SHORT, adapter="ad"),
                 DecodeRequest([10 + i % 80 for i in range(TOKEN_BUCKETS[-1] + 5)], SHORT)]
    fast += [run(decoder, [r])[0] for r in requests[1:]]
    assert padded == [7, 3, 2]  # the next turn fed 3 tokens into its parked row; the long prompt ran unpadded
    eager = [run(EagerBatchDecoder(model, prefixes.get, max_batch=1), [r])[0] for r in requests]
    assert fast == eager


def test_a_few_prompts_arriving_together_replay_a_graph_each_and_give_the_eager_tokens(monkeypatch):
    """A compare's two prompts (different adapters) and three at once each take the one-row prompt graph, padded as
    in it, instead of one eager batch; four go as a batch. Tokens equal the eager decoder's."""
    from backend.decode import fast_batch

    model, prefixes, decoder, graphed = graphed_decoder(monkeypatch, max_batch=4)
    prompts = [[5, 7, 9, 11, 40], [3, 4], [8, 8, 2, 6, 1, 30, 31], [12, 13, 14]]
    groups = [[DecodeRequest(prompts[0], SHORT), DecodeRequest(prompts[0], SHORT, adapter="ad")],
              [DecodeRequest(p, SHORT, adapter=("ad", None)[i % 2]) for i, p in enumerate(prompts[:3])],
              [DecodeRequest(p, SHORT) for p in prompts]]
    assert fast_batch.GRAPHED_PROMPT_ROWS == 3
    # (the second group's first row finds the first group's adapter row parked: one token fed)
    for requests, expected in zip(groups, ([5, 5], [1, 2, 7], [])):
        graphed.clear()
        fast = run(decoder, requests)
        assert graphed == expected
        assert fast == run(EagerBatchDecoder(model, prefixes.get, max_batch=4), requests)


def test_unpadded_one_row_prompts_attend_causally_to_the_end_of_their_slots():
    """Without prompt graphs (a long pasted prompt takes this path on a GPU) one row's prompt is attended causally
    to the end of its slots with no mask (modeling.causal_to_end): a first turn, its next turn over the cached
    tokens, and an adapter's prompt after its prefix slots give the eager decoder's tokens."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False, prompt_graphs=False)
    first = DecodeRequest([5, 7, 9, 11, 40, 41, 42], SHORT)
    fast = [run(decoder, [first])[0]]
    requests = [first, DecodeRequest(first.prompt_ids + fast[0] + [12, 13], SHORT),
                DecodeRequest([3, 4, 50, 51, 52], SHORT, adapter="ad")]
    fast += [run(decoder, [r])[0] for r in requests[1:]]
    assert fast == [run(EagerBatchDecoder(model, prefixes.get, max_batch=1), [r])[0] for r in requests]


def test_the_warm_ups_long_prompt_runs_unpadded_then_as_a_next_turn_and_leaves_no_row(monkeypatch):
    """The warm-up's pasted-document prompt (shortened here) takes the unmasked one-row path twice: from slot 0, and
    as a next turn past the prompt graphs' buckets over its cached slots; no row is left running."""
    from backend.decode import fast_batch, prompt_graphs

    monkeypatch.setattr(fast_batch, "LONG_WARM_TOKENS", 40)
    monkeypatch.setattr(fast_batch, "WIDEN_MIN_ROWS", 16)
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    fed, math = [], decoder._prompt_math
    decoder._prompt_math = lambda inputs, B, T, width, one_slot=None: fed.append((T, width, one_slot)) or math(inputs, B, T, width, one_slot)
    decoder._warm_long_prompt()
    assert decoder.rows == 0
    (t1, w1, slot1), (t2, w2, slot2) = fed
    assert (t1, w1) == (40, 40) and slot1 is not None
    assert t2 > prompt_graphs.TOKEN_BUCKETS[-1] and w2 == 40 + t2 and slot2 == slot1


def test_the_warm_up_runs_two_pasted_documents_as_a_user_sends_them(monkeypatch):
    """After its captures the warm-up runs two long prompts (shortened here) as a user's pasted documents come (the
    first two of a process were ~10 ms slower than the rest): the first from slot 0, the second over the first's
    few shared opening tokens; nothing stays parked or failed. With none asked for, none run."""
    from backend.decode import fast_batch

    monkeypatch.setattr(fast_batch, "LONG_WARM_TOKENS", 40)
    monkeypatch.setattr(fast_batch, "WIDEN_MIN_ROWS", 16)
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    fed, math = [], decoder._prompt_math
    decoder._prompt_math = lambda inputs, B, T, width, one_slot=None: fed.append((T, width)) or math(inputs, B, T, width, one_slot)
    decoder._warm_pasted_documents()
    assert fed == [(40, 40), (36, 40)]
    assert decoder.rows == 0 and decoder.failed() == [] and not decoder._parked
    monkeypatch.setattr(fast_batch, "WARM_PASTED_DOCUMENTS", 0)
    decoder._warm_pasted_documents()
    assert len(fed) == 2
