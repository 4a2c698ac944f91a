"""The chat engine: streaming, cancel, KV-cache reuse across turns, adapters switched live, compare."""

from __future__ import annotations

import threading

import pytest
import torch

from backend.decoding import EagerDecoder
from backend.engine import ChatEngine
from backend.generation import without_partial_character
from backend.kv_cache import KVCache
from backend.service import BackendError, ReplyDone, SamplingParams, TextDelta
from helpers_tiny import make_tiny_model_dir
from test_adapters import write_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = make_tiny_model_dir(tmp_path_factory.mktemp("engine") / "model")
    from backend.configuration import ChatGLMConfig

    config = ChatGLMConfig.from_pretrained(d)
    write_checkpoint(d.parent / "runs" / "checkpoint-5", 4, config=config, seed=1)
    write_checkpoint(d.parent / "runs" / "checkpoint-9", 7, True, config=config, seed=2)
    return d


@pytest.fixture()
def engine(model_dir):
    return ChatEngine.load(str(model_dir), quantization="none", adapter_dirs=[str(model_dir.parent / "runs")], engine="eager", device="cpu")


def collect(events):
    deltas = [e for e in events if isinstance(e, TextDelta)]
    done = [e for e in events if isinstance(e, ReplyDone)]
    return deltas, done


def test_streamed_deltas_add_up_to_the_reply(engine):
    deltas, done = collect(list(engine.stream_reply("你好", [], GREEDY)))
    assert len(done) == 1 and done[0].reply.new_tokens > 0
    assert "".join(d.text for d in deltas) == done[0].reply.text
    assert done[0].reply.adapter is None and not done[0].reply.stopped


def test_greedy_reply_equals_model_chat(engine):
    reply = engine.reply("介绍一下你自己", [("你好", "你好，很高兴见到你。")], GREEDY)
    expected, _ = engine.model.chat(engine.tokenizer, "介绍一下你自己", [("你好", "你好，很高兴见到你。")], do_sample=False, max_new_tokens=16)
    assert reply.text == expected


def test_cancel_from_another_thread_keeps_the_partial_reply(engine):
    cancel = threading.Event()
    events = []
    for event in engine.stream_reply("你好", [], SamplingParams(temperature=0, max_new_tokens=200), cancel=cancel):
        events.append(event)
        if isinstance(event, TextDelta) and len(events) == 3:
            threading.Thread(target=cancel.set).start()
            cancel.wait()
    deltas, done = collect(events)
    reply = done[0].reply
    assert reply.stopped and 0 < reply.new_tokens < 200
    assert reply.text == "".join(d.text for d in deltas)


def test_kv_cache_reuse_equals_reencoding_the_whole_history(engine):
    history = []
    decoder = engine._decoders[0]
    for query in ("你好", "类型#上衣*材质#牛仔布", "再说一次"):
        reused_before = list(decoder.cached_ids)
        reply = engine.reply(query, history, GREEDY)
        ids = engine.prompt_ids(query, history)
        if history:  # the previous turn's tokens were reused, not fed again
            assert len(reused_before) > 0 and ids[: len(reused_before) // 2] == reused_before[: len(reused_before) // 2]
        fresh = EagerDecoder(engine.model)
        fresh_tokens = list(fresh.generate(ids, GREEDY, [engine.tokenizer.eos_token_id]))
        assert without_partial_character(engine.tokenizer.decode(fresh_tokens[: reply.new_tokens])).strip() == reply.text
        history.append((query, reply.text))


def test_cached_logits_equal_full_forward(engine):
    model = engine.model
    ids = torch.tensor([engine.prompt_ids("你好", [("a", "b")])])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -1]
        cache = KVCache()
        model(ids[:, :-5], cache=cache)
        step = model(ids[:, -5:], cache=cache).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_adapter_switch_keeps_history_and_changes_the_answer(engine):
    names = [a.name for a in engine.adapters()]
    assert names == ["runs/checkpoint-5", "runs/checkpoint-9"]
    history = [("你好", "你好，很高兴见到你。")]
    base = engine.reply("介绍一下你自己", history, GREEDY)
    engine.switch_adapter(names[0])
    tuned = engine.reply("介绍一下你自己", history, GREEDY)
    engine.switch_adapter(names[1])  # another pre_seq_len
    other = engine.reply("介绍一下你自己", history, GREEDY)
    assert (base.adapter, tuned.adapter, other.adapter) == (None, names[0], names[1])
    assert len({base.text, tuned.text, other.text}) == 3
    engine.switch_adapter(None)
    assert engine.reply("介绍一下你自己", history, GREEDY).text == base.text
    with pytest.raises(BackendError, match="no adapter named"):
        engine.switch_adapter("nope")


def test_compare_streams_two_adapters(engine):
    engine.switch_adapter("runs/checkpoint-5")
    deltas, done = collect(list(engine.compare("你好", [], GREEDY)))
    by_stream = {d.stream: d.reply for d in done}
    assert by_stream[0].adapter is None and by_stream[1].adapter == "runs/checkpoint-5"
    for stream in (0, 1):
        assert "".join(d.text for d in deltas if d.stream == stream) == by_stream[stream].text
    assert by_stream[0].text == engine.reply("你好", [], GREEDY, adapter=None).text
    assert by_stream[1].text == engine.reply("你好", [], GREEDY, adapter="runs/checkpoint-5").text


def test_sampling_is_reproducible_with_a_seed_and_varies_without(engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=12)
    a = engine.reply("你好", [], params, seed=7)
    b = engine.reply("你好", [], params, seed=7)
    assert a.text == b.text
    assert len({engine.reply("你好", [], params, seed=s).text for s in range(4)}) > 1


def test_register_adapter_at_runtime_and_bad_path(engine, model_dir, tmp_path):
    info = engine.register_adapter(write_checkpoint(tmp_path / "new" / "checkpoint-1", 3, config=engine.model.config))
    assert info in engine.adapters() and info.pre_seq_len == 3
    with pytest.raises(BackendError, match="no adapter checkpoint"):
        engine.register_adapter(tmp_path / "missing")


def test_multi_token_feed_after_a_cached_turn_builds_its_mask_on_the_model_device(engine):
    """Regression: the causal mask for a cached multi-token feed was made on the default (CPU) device."""
    model = engine.model
    ids = torch.tensor([engine.prompt_ids("你好", [])])
    mask = model.transformer._attention_mask(None, 1, 3, 5, 0, torch.device("meta"))
    assert mask.device.type == "meta" and mask.shape == (1, 1, 3, 8)
    cache = KVCache()
    with torch.no_grad():
        model(ids[:, :-3], cache=cache)
        assert model(ids[:, -3:], cache=cache).logits.isfinite().all()
