"""The batched decoder and its scheduler: rows of a batch equal single streams (greedy and seeded),
rows with different adapters and prefix lengths decode together, rows join and leave while others run,
cancel frees a row, the queue is bounded, and a request that cannot fit gets one sentence."""

from __future__ import annotations

import threading

import pytest
import torch

from backend.decode.batcher import Batcher, merge_streams
from backend.decode.eager import EagerBatchDecoder
from backend.decode.protocol import DecodeRequest
from backend.decoding import EagerDecoder
from backend.service import BackendError, BusyError, SamplingParams
from test_fast_decode import random_prefix, tiny_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, repetition_penalty=1.1, max_new_tokens=16)
PROMPTS = [list(range(10, 17)), list(range(40, 60)), [7, 9, 11], list(range(100, 131))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def prefixes(model):
    return {None: None, "a": random_prefix(model, 4, seed=1), "b": random_prefix(model, 9, seed=2)}


def decoder(model, prefixes, **kw) -> EagerBatchDecoder:
    return EagerBatchDecoder(model, prefixes.__getitem__, **kw)


def run_together(dec, requests) -> dict[int, list[int]]:
    """Every request added at once, stepped until all finish."""
    for i, r in enumerate(requests):
        dec.add(i, r)
    out: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    while dec.rows:
        for t in dec.step():
            out[t.row].append(t.token)
    return out


def alone(model, prefixes, request) -> list[int]:
    return run_together(decoder(model, prefixes), [request])[0]


def single_stream(model, prefix, ids, params, stop=(), seed=None) -> list[int]:
    """The existing batch-1 eager decoder, the reference for one row."""
    dec = EagerDecoder(model)
    dec.set_prefix(prefix)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(dec.generate(ids, params, stop, generator=generator))


def test_greedy_rows_with_different_adapters_equal_single_streams(model, prefixes):
    adapters = [None, "a", "b", "a"]
    requests = [DecodeRequest(p, GREEDY, a) for p, a in zip(PROMPTS, adapters)]
    together = run_together(decoder(model, prefixes), requests)
    for i, (p, a) in enumerate(zip(PROMPTS, adapters)):
        assert together[i] == single_stream(model, prefixes[a], p, GREEDY), f"row {i}"
    assert len({tuple(v) for v in together.values()}) == 4


def test_seeded_rows_do_not_depend_on_the_batch(model, prefixes):
    requests = [DecodeRequest(p, SAMPLED, a, seed=11) for p, a in zip(PROMPTS, [None, "b", None, "a"])]
    together = run_together(decoder(model, prefixes), requests)
    for i, r in enumerate(requests):
        assert together[i] == alone(model, prefixes, r)
        assert together[i] == single_stream(model, prefixes[r.adapter], r.prompt_ids, SAMPLED, seed=11)
    assert together[0] != run_together(decoder(model, prefixes), [DecodeRequest(PROMPTS[0], SAMPLED, seed=12)])[0]


def test_rows_finish_independently_and_join_while_others_run(model, prefixes):
    dec = decoder(model, prefixes)
    short = DecodeRequest(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=3), "a")
    stop_at = single_stream(model, None, PROMPTS[1], GREEDY)[5]
    stopping = DecodeRequest(PROMPTS[1], GREEDY, None, stop_token_ids=frozenset({stop_at}))
    late = DecodeRequest(PROMPTS[3], GREEDY, "b")
    dec.add(0, short)
    dec.add(1, stopping)
    got: dict[int, list] = {0: [], 1: [], 2: []}
    finish = {}
    steps = 0
    while dec.rows:
        steps += 1
        if steps == 2:
            dec.add(2, late)  # joins a batch whose rows are mid-reply
        for t in dec.step():
            got[t.row].append(t.token)
            if t.finish:
                finish[t.row] = t.finish
    assert finish == {0: "length", 1: "stop", 2: "length"}
    assert got[0] == alone(model, prefixes, short) and len(got[0]) == 3
    expected = single_stream(model, None, PROMPTS[1], GREEDY)
    assert got[1] == expected[: expected.index(stop_at) + 1]
    assert got[2] == alone(model, prefixes, late)


def test_drop_frees_a_row_and_the_others_continue(model, prefixes):
    dec = decoder(model, prefixes)
    dec.add(0, DecodeRequest(PROMPTS[0], GREEDY, "a"))
    dec.add(1, DecodeRequest(PROMPTS[2], GREEDY, "b"))
    got = {0: [], 1: []}
    for _ in range(4):
        for t in dec.step():
            got[t.row].append(t.token)
    dec.drop(0)
    assert dec.rows == 1
    while dec.rows:
        for t in dec.step():
            got[t.row].append(t.token)
    assert got[1] == single_stream(model, prefixes["b"], PROMPTS[2], GREEDY)


def test_a_following_turn_reuses_the_finished_rows_cache(model, prefixes):
    dec = decoder(model, prefixes)
    first = run_together(dec, [DecodeRequest(PROMPTS[1], GREEDY, "a")])[0]
    turn2 = PROMPTS[1] + first + [5, 6, 7]
    fed = []
    original = model.forward

    def counting(input_ids, *a, **kw):
        fed.append(input_ids.shape[1])
        return original(input_ids, *a, **kw)

    model.forward = counting
    try:
        second = run_together(dec, [DecodeRequest(turn2, GREEDY, "a")])[0]
    finally:
        del model.forward
    assert fed[0] <= 4  # the last reply token and the three new ones, not the whole conversation
    assert second == single_stream(model, prefixes["a"], turn2, GREEDY)


def test_batcher_streams_concurrent_requests_as_rows_of_one_batch(model, prefixes):
    dec = decoder(model, prefixes, max_batch=4)
    batcher = Batcher(dec)
    seen_rows = []
    step = dec.step

    def watching():
        seen_rows.append(dec.rows)
        return step()

    dec.step = watching
    try:
        requests = [DecodeRequest(p, GREEDY, a) for p, a in zip(PROMPTS, [None, "a", "b", None])]
        results = [None] * 4

        def ask(i):
            results[i] = list(batcher.submit(requests[i]))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    for i, r in enumerate(requests):
        assert results[i] == single_stream(model, prefixes[r.adapter], r.prompt_ids, GREEDY)
    assert max(seen_rows) > 1  # they really were decoded together


def test_requests_submitted_together_start_in_one_step(model, prefixes):
    """A compare's two columns: queued at once, admitted in one round, so their prompts run in one pass (submitted
    one after the other, the thread could start the first before the second arrived); all queued or none."""
    dec = decoder(model, prefixes, max_batch=2)
    first_prompts = []
    step = dec.step

    def watching():
        if not first_prompts:
            first_prompts.append(dec.rows)
        return step()

    dec.step = watching
    batcher = Batcher(dec, max_queue=0)
    try:
        with pytest.raises(BusyError, match="try again"):
            batcher.submit_together([DecodeRequest(p, GREEDY) for p in PROMPTS[:3]])
        requests = [DecodeRequest(PROMPTS[0], GREEDY), DecodeRequest(PROMPTS[1], GREEDY, "a")]
        streams = batcher.submit_together(requests)
        results = [list(s) for s in streams]
    finally:
        batcher.close()
    assert first_prompts == [2]
    for got, r in zip(results, requests):
        assert got == single_stream(model, prefixes[r.adapter], r.prompt_ids, GREEDY)


def test_cancel_frees_the_row_and_the_queue_is_bounded(model, prefixes):
    dec = decoder(model, prefixes, max_batch=1)
    batcher = Batcher(dec, max_queue=1)
    try:
        long = SamplingParams(temperature=0, max_new_tokens=400)
        running = batcher.submit(DecodeRequest(PROMPTS[0], long))
        first = next(iter(running))  # it is running now, so the next request waits
        waiting = batcher.submit(DecodeRequest(PROMPTS[2], GREEDY))
        with pytest.raises(BusyError, match="try again"):
            batcher.submit(DecodeRequest(PROMPTS[1], GREEDY))
        running.cancel()
        rest = list(running)
        assert running.finish_reason == "cancelled" and 1 + len(rest) < 400 and first is not None
        assert list(waiting) == single_stream(model, None, PROMPTS[2], GREEDY)
        assert waiting.finish_reason == "length"
    finally:
        batcher.close()


def test_free_rows_take_requests_even_with_no_waiting_room(model, prefixes):
    """max_queue counts requests beyond the rows: with free rows and max_queue 0, requests run (they were all refused)."""
    batcher = Batcher(decoder(model, prefixes, max_batch=2), max_queue=0)
    try:
        long = SamplingParams(temperature=0, max_new_tokens=400)
        a, b = batcher.submit(DecodeRequest(PROMPTS[0], long)), batcher.submit(DecodeRequest(PROMPTS[1], long))
        with pytest.raises(BusyError, match="2 decoding rows are busy"):
            batcher.submit(DecodeRequest(PROMPTS[2], GREEDY))
        a.cancel()
        b.cancel()
        assert list(a) is not None and list(b) is not None and {a.finish_reason, b.finish_reason} <= {"cancelled", "length"}
    finally:
        batcher.close()


def test_requests_that_cannot_fit_wait_or_get_one_sentence(model, prefixes):
    slots = len(PROMPTS[1]) + GREEDY.max_new_tokens + 4  # adapter "a" takes 4 prefix slots
    dec = decoder(model, prefixes, kv_budget_bytes=slots * decoder(model, prefixes).slot_bytes)
    with pytest.raises(BackendError, match="GiB of cache"):
        dec.check(DecodeRequest(PROMPTS[1], SamplingParams(temperature=0, max_new_tokens=100)))
    with pytest.raises(BackendError, match="context"):
        dec.check(DecodeRequest(list(range(600)), GREEDY))
    batcher = Batcher(dec)
    try:  # each fits alone, not two together: the second waits for the first, both complete
        a, b = (batcher.submit(DecodeRequest(PROMPTS[1], GREEDY)), batcher.submit(DecodeRequest(PROMPTS[1], GREEDY, "a")))
        out = {}
        for i, token in merge_streams([a, b]):
            out.setdefault(i, []).append(token)
        assert out[0][:-1] == single_stream(model, None, PROMPTS[1], GREEDY)
        assert out[1][:-1] == single_stream(model, prefixes["a"], PROMPTS[1], GREEDY)
    finally:
        batcher.close()


def test_the_fast_decoder_serves_the_protocol_one_row_at_a_time(model, prefixes):
    from backend.decode.fast import SerialFastDecoder
    from backend.fast_decode import FastDecoder

    fast = SerialFastDecoder(FastDecoder(model, max_seq_len=256, weights="same"), prefixes.__getitem__)
    assert fast.max_batch == 1
    batcher = Batcher(fast)
    try:
        requests = [DecodeRequest(PROMPTS[0], GREEDY, "a"), DecodeRequest(PROMPTS[1], GREEDY, None),
                    DecodeRequest(PROMPTS[2], SAMPLED, "b", seed=11),
                    DecodeRequest(PROMPTS[3], GREEDY, None, stop_token_ids=frozenset({single_stream(model, None, PROMPTS[3], GREEDY)[2]}))]
        streams = [batcher.submit(r) for r in requests]  # queued behind each other, adapters switching
        outputs = [list(s) for s in streams]
    finally:
        batcher.close()
    for r, out in zip(requests[:2], outputs):
        assert out == single_stream(model, prefixes[r.adapter], r.prompt_ids, GREEDY)
    assert len(outputs[2]) == SAMPLED.max_new_tokens and streams[2].finish_reason == "length"
    assert len(outputs[3]) == 3 and streams[3].finish_reason == "stop"


def test_bad_sampling_settings_are_one_sentence_at_submit(model, prefixes):
    batcher = Batcher(decoder(model, prefixes))
    try:
        with pytest.raises(BackendError, match="bad sampling settings"):
            batcher.submit(DecodeRequest(PROMPTS[0], SamplingParams(temperature=0.7, repetition_penalty=-1.0)))
        with pytest.raises(BackendError, match="at least 1 new token"):
            batcher.submit(DecodeRequest(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=0)))
        assert list(batcher.submit(DecodeRequest(PROMPTS[0], GREEDY))) == single_stream(model, None, PROMPTS[0], GREEDY)
    finally:
        batcher.close()


def test_the_fast_decoder_places_a_new_row_in_the_smallest_bucket_evicting_a_parked_row_if_needed():
    """A step computes every row below its bucket: a new row goes low, even if a parked conversation must go."""
    from backend.decode.fast_batch import BatchFastDecoder, _Parked

    decoder = BatchFastDecoder(tiny_model(), lambda name: None, max_batch=8, use_graphs=False)
    decoder._parked.update({0: _Parked(None, [9, 9]), 1: _Parked(None, [8, 8]), 2: _Parked(None, [7, 7])})
    greedy = SamplingParams(temperature=0.0)
    decoder.add(100, DecodeRequest([1, 2, 3], greedy))
    assert decoder._pending[0].slot == 0  # the oldest parked row in bucket 1, though rows 3-7 are free
    decoder.add(101, DecodeRequest([1, 2, 3], greedy))
    assert decoder._pending[1].slot == 1  # two rows fit bucket 2: the parked row 1 goes
    decoder.add(102, DecodeRequest([1, 2, 3], greedy))
    assert decoder._pending[2].slot == 3 and 2 in decoder._parked  # bucket 4 has a free row: row 2 stays
    decoder._pending.clear()
    decoder._parked.clear()
    assert decoder._take_slot(None, [4, 5]) == (0, 0)
    decoder._parked[3] = _Parked(None, [4, 5, 6, 7])
    assert decoder._take_slot(None, [4, 5, 6, 7, 8]) == (3, 4)  # a conversation's next turn finds its row


def test_streams_read_on_an_event_loop_get_the_same_tokens_without_a_thread_each(model, prefixes):
    """``async for`` over streams submitted with a loop: the decoding thread hands tokens to the loop."""
    import asyncio

    dec = decoder(model, prefixes, max_batch=4)
    batcher = Batcher(dec)
    requests = [DecodeRequest(p, GREEDY, a) for p, a in zip(PROMPTS, [None, "a", "b", None])]

    async def read_all():
        loop = asyncio.get_running_loop()
        threads = threading.active_count()

        async def read(request):
            return [t async for t in batcher.submit(request, loop=loop)]

        results = await asyncio.gather(*(read(r) for r in requests))
        assert threading.active_count() == threads  # no reader thread was started
        return results

    try:
        results = asyncio.run(read_all())
    finally:
        batcher.close()
    for r, tokens in zip(requests, results):
        assert tokens == single_stream(model, prefixes[r.adapter], r.prompt_ids, GREEDY)



def test_a_steps_tokens_reach_the_event_loop_in_one_wake_up(model, prefixes):
    """Four rows read on one loop: each step wakes the loop once for all its rows' tokens, not once a token."""
    import asyncio

    dec = decoder(model, prefixes, max_batch=4)
    steps = []
    step = dec.step
    dec.step = lambda: steps.append(1) or step()
    batcher = Batcher(dec)
    requests = [DecodeRequest(p, GREEDY, a) for p, a in zip(PROMPTS, [None, "a", "b", None])]
    wake_ups = []

    async def read(stream):
        return [t async for t in stream]

    async def main():
        loop = asyncio.get_running_loop()
        call = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wake_ups.append(1) or call(*a)
        streams = [batcher.submit(r, loop=loop) for r in requests]
        return await asyncio.gather(*(read(s) for s in streams))

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    tokens = sum(len(t) for t in results)
    assert tokens > 2 * len(steps)  # several rows a step
    assert len(wake_ups) <= len(steps)  # tokens and ends of one step: one call
    for r, got in zip(requests, results):
        assert got == single_stream(model, prefixes[r.adapter], r.prompt_ids, GREEDY)


def test_a_job_run_when_idle_waits_for_running_rows_and_goes_before_waiting_requests(model, prefixes):
    """The app's background warm-up: it runs on the decoding thread once no row runs, a request asked meanwhile
    waits for it (and is then served as usual), its exception comes back on the future, and close cancels jobs
    that never ran."""
    dec = decoder(model, prefixes, max_batch=2)
    batcher = Batcher(dec, name="decoder-under-test")
    seen, release = [], threading.Event()

    def job():
        seen.append((threading.current_thread().name, dec.rows))
        release.wait(10)
        return "warm"

    try:
        running = batcher.submit(DecodeRequest(PROMPTS[0], GREEDY))
        first = next(iter(running))  # a row runs: the job must wait for it
        done = batcher.run_when_idle(job)
        asked = batcher.submit(DecodeRequest(PROMPTS[2], GREEDY))  # behind the job, though a row is free
        rest = list(running)
        assert [first] + rest == single_stream(model, None, PROMPTS[0], GREEDY)
        for _ in range(200):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == [("decoder-under-test", 0)]  # on the decoding thread, with no row in the decoder
        assert not done.done() and dec.rows == 0  # the asked request waits while the job runs
        release.set()
        assert done.result(10) == "warm"
        assert list(asked) == single_stream(model, None, PROMPTS[2], GREEDY)

        def broken():
            raise RuntimeError("out of memory")

        failed = batcher.run_when_idle(broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            failed.result(10)
        assert list(batcher.submit(DecodeRequest(PROMPTS[2], GREEDY))) == single_stream(model, None, PROMPTS[2], GREEDY)
    finally:
        batcher.close()
    assert batcher.run_when_idle(job).cancelled()  # after close: nothing runs


def test_a_card_short_of_memory_gets_two_shorter_rows_in_half_the_cache_budget(monkeypatch):
    """The app's fast decoder holds two rows (a chat, a compare). Where the model's whole context does not fit in its
    share of the free memory (a 6 GiB card), each row gets a shorter context and the two take half that share, as
    the one row measured beside training did; the choice is said once."""
    import types
    import warnings

    from backend.decode import fast_batch

    gib = 2**30
    monkeypatch.setattr(fast_batch, "free_bytes", lambda device: 2.2 * gib)
    fake = types.SimpleNamespace(device=torch.device("cuda"), slot_bytes=28 * 2 * 2 * 128 * 2, memory_short=False)
    cfg = types.SimpleNamespace(seq_length=32768)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        context, rows = fast_batch.BatchFastDecoder._size_cache(fake, cfg, 32768, 2, 0.25)
    budget = 2.2 * gib * 0.25
    assert rows == 2 and fake.memory_short and 4096 < context < 32768
    assert rows * (fast_batch.PREFIX_SLOTS + context) * fake.slot_bytes <= budget / 2
    assert [str(w.message) for w in said] == [f"GPU memory is short: the fast decoder keeps {context} tokens of context per reply."]
    monkeypatch.setattr(fast_batch, "free_bytes", lambda device: 40 * gib)  # a big card: the whole context, no notice
    fake.memory_short = False
    assert fast_batch.BatchFastDecoder._size_cache(fake, cfg, 32768, 2, 0.25) == (32768, 2) and not fake.memory_short


def test_every_caller_on_a_gpu_gets_the_batched_fast_decoder_with_two_rows_for_a_chat(monkeypatch):
    """What the app and --prompt run (ChatEngine without max_batch): the batched fast decoder holding two rows, a
    chat's reply or a compare's two columns in one batch, with the model's whole context; a server's or evaluation's
    rows at FAST_CACHE_SLOTS; the older one-row decoder only when asked for ("serial")."""
    import backend.decode as decode
    from backend.decode import fast_batch

    made = []
    monkeypatch.setattr(fast_batch, "BatchFastDecoder", lambda model, prefix_of, **kw: made.append(kw) or kw)
    model = tiny_model()
    decode.make_batch_decoder(model, "fast")
    decode.make_batch_decoder(model, "fast", max_batch=16)
    seq = model.config.seq_length
    assert made[0] == dict(max_batch=decode.CHAT_ROWS, context_length=seq, cache_share=decode.CHAT_CACHE_SHARE)
    assert made[1] == dict(max_batch=16, context_length=min(seq, decode.FAST_CACHE_SLOTS))
    assert decode.CHAT_ROWS == 2
    assert type(decode.make_batch_decoder(model, "auto")).__name__ == "EagerBatchDecoder"  # no GPU here


def test_causal_to_end_equals_the_explicit_mask():
    from backend.modeling import causal_to_end

    g = torch.Generator().manual_seed(0)
    for T, W in ((6, 6), (5, 13)):
        q, k, v = (torch.randn(1, n, s, 16, generator=g) for n, s in ((8, T), (2, W), (2, W)))
        mask = torch.arange(W)[None, :] <= (W - T + torch.arange(T))[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(causal_to_end(q, k, v), expected)


def test_the_warm_ups_long_prompts_skip_quietly_on_a_card_short_of_memory(monkeypatch):
    """A long prompt that runs out of memory in the warm-up fails its row, not the warm-up: nothing is left for a
    caller to read as a failure, no row stays, the long prompts after it are not tried, and the decoder takes
    requests after."""
    from backend.decode import fast_batch

    monkeypatch.setattr(fast_batch, "LONG_WARM_TOKENS", 40)
    monkeypatch.setattr(fast_batch, "WIDEN_MIN_ROWS", 16)
    decoder = fast_batch.BatchFastDecoder(tiny_model(), lambda name: None, max_batch=2, use_graphs=False)

    tried = []

    def short_of_memory(rows):
        tried.append(len(rows[0].tokens))
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(decoder, "_prefill", short_of_memory)
    decoder._warm_long_prompt()
    assert decoder.rows == 0 and decoder.failed() == []
    decoder._warm_pasted_documents()  # the first fails its row: the second is not tried
    assert tried == [40, 40] and decoder.rows == 0 and decoder.failed() == [] and not decoder._parked


def test_only_a_4bit_models_few_rows_launch_as_programmatic_dependents(monkeypatch):
    """The general step's programmatic dependent launches (Hopper, in CUDA graphs) are for a 4-bit model's one or two
    rows, whose linears are all quant_linear's: not a 16-bit or int8 model's (the int8 matmul tiles lost 11.5% with
    them, bench/NOTES.md run 45), not more rows, not before Hopper or without graphs, and not with the switch off."""
    from backend.decode.fast_batch import BatchFastDecoder, rows_pdl
    from tests.kernels_interpreted.decoder_models import int4_release_model, make_model

    four_bit = BatchFastDecoder(int4_release_model()[0], lambda a: None, max_batch=4)
    plain = BatchFastDecoder(make_model()[0], lambda a: None, max_batch=4)
    assert not four_bit._rows_pdl(2)  # a CPU decoder: no graphs, no Hopper
    assert rows_pdl(four_bit.layers, 1, True) and rows_pdl(four_bit.layers, 2, True)
    assert not rows_pdl(four_bit.layers, 4, True) and not rows_pdl(four_bit.layers, 2, False)
    assert not rows_pdl(plain.layers, 2, True)
    monkeypatch.setenv("GLMCHAT_ROWS_PDL_4BIT", "0")
    assert not rows_pdl(four_bit.layers, 2, True)


def test_a_capture_that_fails_with_programmatic_launches_drops_them_for_every_step(monkeypatch):
    """A driver without programmatic dependent launches in CUDA graphs fails the first capture that uses them (a
    4-bit compare's here): the decoder captures again with plain launches, and no later step tries them; a capture
    that fails without them raises."""
    import backend.cuda_streams as cuda_streams
    from backend.decode.fast_batch import BatchFastDecoder
    from tests.kernels_interpreted.decoder_models import int4_release_model

    dec = BatchFastDecoder(int4_release_model()[0], lambda a: None, max_batch=4)
    dec.pdl_in_graphs = True  # as on a Hopper card in graphs
    tries = []

    def capture(step, device, pool):
        tries.append(dec._rows_pdl(2))
        if tries[-1]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return "graph", ("logits", "picks")

    monkeypatch.setattr(cuda_streams, "warm_and_capture", capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert dec._capture(2) == "graph" and tries == [True, False]
    assert not dec.pdl_in_graphs and not dec._step_pdl(1) and not dec._step_pdl(2)
    def fails(step, device, pool):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cuda_streams, "warm_and_capture", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        dec._capture(4)
