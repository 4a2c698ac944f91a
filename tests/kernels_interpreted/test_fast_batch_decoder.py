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


def test_int8_rows_through_the_gemvs_or_the_matmul_equal_the_packed_kernels(monkeypatch):
    """One row of an int8 linear runs int8_gemv.gemv, 2-4 rows kernels.gemv_rows, more the int8 matmul (here its
    CPU form) with RMSNorm and SwiGLU as kernels of their own: the same sums as quant_linear's, epilogues included."""
    from backend.decode.batch_linear import ONE_ROW_GEMV_MAX_M, BatchLinear
    from backend.kernels import gemv_rows
    from backend.kernels.gemv_4bit import quant_linear

    rows_seen = []
    real = gemv_rows.gemv_rows
    monkeypatch.setattr(gemv_rows, "gemv_rows", lambda x, *a, **k: rows_seen.append(x.shape[0]) or real(x, *a, **k))
    layer = torch.nn.Module()
    layer.weight = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    layer.weight_scale = torch.rand(24) * 1e-2
    layer.in_features, layer.bias = 64, None
    lin = BatchLinear(layer, torch.float32, "dense")
    assert lin.q.fmt == "int8" and ONE_ROW_GEMV_MAX_M == 1
    g = 1 + 0.1 * torch.randn(64)
    for m in (1, 2, 3, 4, 5):
        x, res = torch.randn(m, 64), torch.randn(m, 12)
        out = lin(x, norm=g, swiglu=True, residual=res)
        ref = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), m
        res = torch.randn(m, 24)
        assert torch.allclose(lin(x, residual=res), quant_linear(x, lin.q, residual=res), rtol=1e-4, atol=1e-4), m
    assert rows_seen == [2, 2, 3, 3, 4, 4]
    # GLMCHAT_ROWS_GEMV=0 (the A/B switch) sends them to the matmul
    monkeypatch.setenv("GLMCHAT_ROWS_GEMV", "0")
    off = BatchLinear(layer, torch.float32, "dense")
    x = torch.randn(2, 64)
    assert torch.allclose(off(x), lin(x), rtol=1e-4, atol=1e-4) and rows_seen[-1] == 2 and len(rows_seen) == 7
    # so does a card whose tuning timed the matmul path faster (tuned_config None), for the same sums
    monkeypatch.setattr(gemv_rows, "tuned_config", lambda *a, **k: None)
    x, res = torch.randn(3, 64), torch.randn(3, 12)
    want = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
    assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want, rtol=1e-4, atol=1e-4)
    assert len(rows_seen) == 7
    # and a card that tuned gemv_rows to quant_words' kernel: the same sums, residual added after SwiGLU
    monkeypatch.setattr(gemv_rows, "tuned_config", lambda *a, **k: gemv_rows.RowsGemvConfig(4, 32, kernel="words"))
    for m in (2, 3):
        x, res = torch.randn(m, 64), torch.randn(m, 12)
        want = quant_linear(x, lin.q, norm_weight=g, swiglu=True, residual=res)
        assert torch.allclose(lin(x, norm=g, swiglu=True, residual=res), want, rtol=1e-4, atol=1e-4), m
    assert len(rows_seen) == 9


def test_steps_fed_on_the_device_give_the_tokens_of_host_fed_steps():
    """While the same rows run, none waits to join and every token is picked on the device, the next step is
    launched from the last one's picks before the host reads them (decode-ahead). Rows that end at different
    steps (their length, a stop token), greedy and sampled on the device, and a row dropped while a step ahead is
    queued: the same tokens as host-fed steps give, and most steps went ahead."""
    model, prefixes = make_model()
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False),
                [DecodeRequest([8, 8, 2, 6], SamplingParams(temperature=0.0, max_new_tokens=12))])[0]
    stop = next(t for i, t in enumerate(alone) if i >= 3 and t not in alone[:i])  # a stop mid-reply
    requests = [
        DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=10)),
        DecodeRequest([3, 4], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=9), adapter="ad", seed=3),
        DecodeRequest([1, 30, 31], SamplingParams(temperature=0.0, max_new_tokens=4)),
        DecodeRequest([8, 8, 2, 6], SamplingParams(temperature=0.0, max_new_tokens=12), stop_token_ids=frozenset({stop})),
        DecodeRequest([9, 9, 9], SamplingParams(temperature=0.0, max_new_tokens=12)),  # dropped after 5 steps
    ]

    def tokens(decode_ahead: bool) -> tuple[dict, int]:
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=8, use_graphs=False, decode_ahead=decode_ahead)
        went_ahead = []
        queue_ahead = decoder._queue_ahead
        decoder._queue_ahead = lambda: (lambda queued: went_ahead.append(queued is not None) or queued)(queue_ahead())
        out = {i: [] for i in range(len(requests))}
        for i, r in enumerate(requests):
            decoder.add(i, r)
        for steps in range(100):
            if not decoder.rows:
                break
            if steps == 5:
                decoder.drop(4)
            for t in decoder.step():
                out[t.row].append(t.token)
        return out, sum(went_ahead)

    ahead, went = tokens(True)
    host_fed, none = tokens(False)
    assert ahead == host_fed and none == 0 and went >= 6, went
    assert len(ahead[2]) == 4 and ahead[3] == alone[: alone.index(stop) + 1] and len(ahead[0]) == 10
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=4), [requests[0], requests[2], requests[3]])
    assert [ahead[0], ahead[2], ahead[3]] == [eager[0], eager[1], eager[2]]


def test_a_step_whose_logits_a_replay_ahead_overwrote_hands_out_none_and_the_others_the_right_ones():
    """In CUDA graphs every replay of a bucket writes the same logits buffer, so once the step ahead is queued the
    queued step's logits are the next step's (on the GPU, check_fast_batch.py found bf16 "logits" 70% off). Such
    steps hand their rows no logits; the steps that keep theirs hand out the logits of host-fed steps."""
    model, prefixes = make_model()
    requests = [DecodeRequest([5, 7, 9, 11], GREEDY), DecodeRequest([3, 4], GREEDY, adapter="ad")]

    def logits_seen(decode_ahead: bool) -> list:
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False, decode_ahead=decode_ahead)
        buffers = {}

        def replay(bucket):  # as a captured graph: one output buffer a bucket, written over by every replay
            logits, picks = decoder._step_math(bucket)
            kept = buffers.setdefault(bucket, (torch.empty_like(logits), torch.empty_like(picks)))
            kept[0].copy_(logits), kept[1].copy_(picks)
            return kept

        decoder.use_graphs, decoder._run_step = True, replay
        seen = []
        take = decoder._take
        decoder._take = lambda row, lg, *a: seen.append((row.id, None if lg is None else lg.clone())) or take(row, lg, *a)
        run(decoder, requests)
        return seen

    ahead, host_fed = logits_seen(True), logits_seen(False)
    assert [r for r, _ in ahead] == [r for r, _ in host_fed]
    assert any(lg is None for _, lg in ahead) and all(lg is not None for _, lg in host_fed)
    kept = [(a, b) for (_, a), (_, b) in zip(ahead, host_fed) if a is not None]
    assert len(kept) >= 2 and all(torch.equal(a, b) for a, b in kept)


def test_a_warm_up_that_fails_midway_leaves_no_row_behind(monkeypatch):
    """The app warms the decoder in the background; if that fails (out of memory, say) in the middle of its replies,
    their rows are gone and a real request decodes as on a fresh decoder."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False)
    real_step, steps = decoder.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_step()

    monkeypatch.setattr(decoder, "step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        decoder.warm_up()
    monkeypatch.setattr(decoder, "step", real_step)
    assert decoder.rows == 0
    request = DecodeRequest([5, 7, 9, 11], GREEDY, adapter="ad")
    fresh = run(BatchFastDecoder(model, prefixes.get, max_batch=4, use_graphs=False), [request])
    assert run(decoder, [request]) == fresh


def test_a_warm_up_without_captures_tunes_the_few_row_linears_and_runs_a_chats_replies_one_row_at_a_time(monkeypatch):
    """Where memory is short the engine's background warm-up tunes linears at up to 64 rows (decode steps and short
    prompts), runs one row's step once (its kernels compiled), then a chat's replies (greedy, sampled on the device)
    and a next turn into a parked row, one row at a time: no step of two rows or more, no long prompt, nothing left
    running or parked, and a reply after it gives the eager decoder's tokens."""
    from backend.decode import batch_linear

    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False)
    rows = []
    call = batch_linear.BatchLinear.__call__
    monkeypatch.setattr(batch_linear.BatchLinear, "__call__", lambda self, x, **kw: rows.append(x.shape[0]) or call(self, x, **kw))
    monkeypatch.setattr(decoder, "_warm_long_prompt", lambda: pytest.fail("no long prompt where memory is short"))
    steps, buckets = [], []
    one_row = type(decoder._one_row_step).__call__
    monkeypatch.setattr(type(decoder._one_row_step), "__call__", lambda step: steps.append(1) or one_row(step))
    step_math = decoder._step_math
    monkeypatch.setattr(decoder, "_step_math", lambda bucket: buckets.append(bucket) or step_math(bucket))
    decoder.warm_up(captures=False)
    assert rows and max(rows) <= batch_linear.QUANT_MAX_M and 1 in rows
    assert decoder.rows == 0 and not decoder._parked and not decoder._graphs
    assert len(steps) > 1 and set(buckets) == {1}  # the warm-up's own step run, then the replies' steps
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=3), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_one_row_through_the_fused_step_equals_the_general_step_token_for_token(weights):
    """A chat's row (bucket 1) takes decode/one_row_step.py's step: rotary and the cache write in the QKV GEMV (4-bit
    layers: quant_linear, then the rotary kernel), the greedy pick folded into the output GEMV. With an adapter's
    prefix, a next turn into the parked row, and a sampled reply, it gives the general step's tokens, logits and
    cache, bit for bit (the eager decoder's tokens: the tests above and below, whose one-row decoders take this
    step)."""
    model, prefixes = make_model() if weights == "float" else int4_release_model()
    short = SamplingParams(temperature=0.0, max_new_tokens=3)
    first = DecodeRequest([5, 7, 9, 11], short, adapter="ad")
    sampled = DecodeRequest([6, 1, 30], SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=3), seed=3)

    def replies(fused: bool):
        decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
        assert decoder._one_row_step is not None
        if not fused:
            decoder._one_row_step = None
        out = [run(decoder, [first])[0]]
        out.append(run(decoder, [DecodeRequest(first.prompt_ids + out[0] + [9], short, adapter="ad")])[0])  # parked row
        out.append(run(decoder, [sampled])[0])
        decoder.tokens[0], decoder.positions[0], decoder.prefix_lens[0] = 4, 7, 3
        logits, picks = decoder._step_math(1)
        return out, logits.clone(), picks.clone(), decoder.k_cache.clone(), decoder.v_cache.clone()

    fused, general = replies(True), replies(False)
    assert fused[0] == general[0] and len(fused[0][1]) == 3
    for a, b in zip(fused[1:], general[1:]):
        assert torch.equal(a, b)


def test_the_fused_step_writes_no_key_for_an_idle_row():
    """Graphs are captured with row 0 idle (position -1): the QKV GEMV's epilogue writes nothing to the cache then."""
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    decoder.k_cache.fill_(7.0)
    decoder.v_cache.fill_(7.0)
    decoder.positions[0] = -1
    decoder._step_math(1)
    assert bool((decoder.k_cache == 7.0).all()) and bool((decoder.v_cache == 7.0).all())


@pytest.mark.parametrize("dtype,divisor", [(torch.float16, 1.0), (torch.float16, 2.0), (torch.float32, 2.0)])
def test_the_gemv_rotary_epilogue_equals_the_rotary_kernel_after_the_linear(dtype, divisor):
    """The QKV GEMV's rotary + cache write (int8_gemv.gemv(rope=...)) against the plain GEMV followed by
    kernels.attention_batch.rope_cache_write, in fp16 with ChatGLM2's angle rounding and with 32k's rope_ratio: the
    same q and the same keys and values in the row's slot after its prefix, bit for bit."""
    from backend.int8_linear import LinearWeights, quantize_per_channel
    from backend.kernels.int8_gemv import gemv
    from backend.kernels import attention_batch as A

    torch.manual_seed(1)
    H, G, D, S, K = 4, 2, 16, 40, 64
    N = (H + 2 * G) * D
    w8, scale = quantize_per_channel(torch.randn(N, K) * 0.1)
    lw = LinearWeights(w8, scale, (torch.randn(N) * 0.1).to(dtype))
    x, g = torch.randn(K).to(dtype), (1 + 0.1 * torch.randn(K)).to(dtype)
    pos, pre = torch.tensor([11]), torch.tensor([5])
    inv_freq = A.rotary_inv_freq(D // 2, "cpu").to(dtype).float()
    angle_dtype = dtype if dtype != torch.float32 else None
    qkv = torch.empty(1, N, dtype=dtype)
    gemv(x, lw, qkv[0], norm_weight=g, eps=1e-5)
    kc, vc = torch.zeros(1, G, S, D, dtype=dtype), torch.zeros(1, G, S, D, dtype=dtype)
    q_want = A.rope_cache_write(qkv, kc, vc, pos, pre, num_heads=H, num_groups=G, inv_freq=inv_freq,
                                position_divisor=divisor, angle_dtype=angle_dtype)
    out = torch.empty(N, dtype=dtype)
    kf, vf = torch.zeros(G, S, D, dtype=dtype), torch.zeros(G, S, D, dtype=dtype)
    gemv(x, lw, out, norm_weight=g, eps=1e-5, rope=dict(q_rows=H * D, kv_rows=G * D, head_dim=D, inv_freq=inv_freq,
                                                         pos=pos, prefix=pre, divisor=divisor, angle_dtype=angle_dtype,
                                                         k_cache=kf, v_cache=vf))
    assert torch.equal(out[: H * D].view(H, D), q_want[0])
    assert torch.equal(kf, kc[0]) and torch.equal(vf, vc[0]) and bool(kf[:, 16].abs().sum() > 0)
    # the older one-row decoder's form: the slot beside the position on the device
    kf2, vf2, out2 = torch.zeros_like(kf), torch.zeros_like(vf), torch.empty_like(out)
    gemv(x, lw, out2, norm_weight=g, eps=1e-5, rope=dict(q_rows=H * D, kv_rows=G * D, head_dim=D, inv_freq=inv_freq,
                                                          pos=torch.tensor([11, 16]), divisor=divisor,
                                                          angle_dtype=angle_dtype, k_cache=kf2, v_cache=vf2))
    assert torch.equal(out2[: H * D], out[: H * D]) and torch.equal(kf2, kf) and torch.equal(vf2, vf)


def test_tuning_the_one_row_step_runs_every_candidate_tile_to_the_same_step_and_keeps_the_winner(monkeypatch, tmp_path):
    """decode/one_row_tuning.py's descent through BatchFastDecoder.tune_one_row, with the step run (not timed) for
    each candidate tile: every tile gives the default's logits, the fastest (by a cost model) is kept, stored for
    this device and applied by the next decoder; row 0 is left idle and its cache row unclaimed, and a reply after
    it gives the eager decoder's tokens."""
    from backend.decode import one_row_tuning as T

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    model, prefixes = make_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    logits_seen = []

    def measure(configs):
        T.apply(decoder, configs)
        logits_seen.append(decoder._one_row_step()[0].clone())
        cost = 1.0 - 0.01 * (configs["fc1"] == T.CANDIDATES["float"]["fc1"][2])
        return lambda: cost

    decoder.tune_one_row(measure)
    assert len(logits_seen) == 1 + sum(len(v) for v in T.CANDIDATES["float"].values())
    assert all(torch.allclose(x, logits_seen[0], rtol=1e-5, atol=1e-5) for x in logits_seen)
    assert decoder.layers[0].up.row_config == T.CANDIDATES["float"]["fc1"][2]
    assert decoder.output.row_config == T.defaults(decoder)["output"]
    assert int(decoder.positions[0]) == -1 and 0 not in decoder._parked
    stored = T.cached(decoder)  # (the CPU's tuning file here; a GPU model's on a GPU)
    assert stored == {k: lin[0].row_config for k, lin in T.linears_by_kind(decoder).items()}
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=2), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])


def int4_release_model():
    """The tiny model with its layers' linears packed as the chatglm2-6b-int4 release stores them."""
    from backend.int4_release import QUANTIZED_LINEARS, Int4Linear, pack_int4

    model, prefixes = make_model()
    for layer in model.transformer.encoder.layers:
        for parent in (layer.self_attention, layer.mlp):
            for name in QUANTIZED_LINEARS:
                dense = getattr(parent, name, None)
                if dense is None:
                    continue
                packed = Int4Linear(dense.in_features, dense.out_features, dense.bias is not None, torch.float32)
                packed.weight, scale = pack_int4(dense.weight.detach())
                packed.weight_scale = scale.float()
                if dense.bias is not None:
                    packed.bias.data.copy_(dense.bias.detach())
                setattr(parent, name, packed)
    return model, prefixes


@pytest.mark.parametrize("words", [False, True])
def test_int4_release_rows_equal_the_eager_decoder_through_either_4bit_gemv(words, monkeypatch):
    """The packed weights through quant_linear, one row and a compare's two: the earlier GEMV (the default config)
    or quant_words' (put first, as a tuner picking it would), the eager decoder's tokens either way."""
    from backend.kernels import gemv_4bit as Q

    monkeypatch.setattr(Q, "_chosen", {})  # (picks memoised by an earlier test)
    if words:
        real = Q.candidate_configs
        monkeypatch.setattr(Q, "candidate_configs", lambda fmt, m, swiglu=False: (
            [c for c in real(fmt, m, swiglu) if c.kernel == "words"] + real(fmt, m, swiglu)))
    launched = []
    real_launch = Q._launch
    monkeypatch.setattr(Q, "_launch", lambda x, w, out, *a: launched.append(a[-2].kernel) or real_launch(x, w, out, *a))
    model, prefixes = int4_release_model()
    requests = [DecodeRequest([5, 7, 9, 11], GREEDY), DecodeRequest([3, 4], GREEDY, adapter="ad")]
    eager = run(EagerBatchDecoder(model, prefixes.get, max_batch=2), requests)
    fast = run(BatchFastDecoder(model, prefixes.get, max_batch=2, use_graphs=False), requests)
    assert fast == eager
    alone = run(BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False), requests[:1])
    assert alone[0] == eager[0]
    assert ("words" in launched) == words


def test_tuning_a_4bit_models_one_row_step_runs_every_words_tile_to_the_same_step(monkeypatch, tmp_path):
    """The int4 release's layers in the one-row descent: each of quant_linear's one-row words tiles, run inside the
    step, gives the step that quant_linear's own pick gives; the kept tile is applied, and a reply after tuning gives
    the eager decoder's tokens."""
    from backend.decode import one_row_tuning as T

    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path))
    model, prefixes = int4_release_model()
    decoder = BatchFastDecoder(model, prefixes.get, max_batch=1, use_graphs=False)
    candidates = T.candidates_for(decoder)
    assert all(candidates[k] for k in ("qkv", "dense", "fc1", "fc2"))
    logits_seen = []
    faster = candidates["fc2"][0]

    def measure(configs):
        T.apply(decoder, configs)
        logits_seen.append(decoder._one_row_step()[0].clone())
        cost = 1.0 - 0.01 * (configs["fc2"] == faster)
        return lambda: cost

    decoder.tune_one_row(measure)
    assert len(logits_seen) == 1 + sum(len(v) for v in candidates.values())
    assert all(torch.allclose(x, logits_seen[0], rtol=1e-4, atol=1e-4) for x in logits_seen)
    assert decoder.layers[0].down.row_config == faster and decoder.layers[0].qkv.row_config is None
    request = DecodeRequest([5, 7, 9, 11], SamplingParams(temperature=0.0, max_new_tokens=2), adapter="ad")
    assert run(decoder, [request]) == run(EagerBatchDecoder(model, prefixes.get, max_batch=2), [request])
