"""The chat engine: streaming, cancel, KV-cache reuse across turns, adapters switched live, compare."""

from __future__ import annotations

import threading

import pytest
import torch

from backend.decode.eager import common_prefix_length
from backend.decoding import EagerDecoder
from backend.engine import ChatEngine
from backend.generation import without_partial_character
from backend.kv_cache import KVCache
from backend.chat_format import to_messages
from backend.service import BackendError, ChatMessage, ReplyDone, SamplingParams, TextDelta
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
    decoder = engine.decoder
    for query in ("你好", "类型#上衣*材质#牛仔布", "再说一次"):
        ids = engine.prompt_ids(query, history)
        kept = [f.cached_ids for f in decoder._finished]
        reply = engine.reply(query, history, GREEDY)
        if history:  # the previous turn's cache was kept, and it begins this prompt
            before = engine.prompt_ids(*turn_before(history))
            assert any(common_prefix_length(k, ids) >= len(before) for k in kept)
        fresh = EagerDecoder(engine.model)
        fresh_tokens = list(fresh.generate(ids, GREEDY, [engine.tokenizer.eos_token_id]))
        assert without_partial_character(engine.tokenizer.decode(fresh_tokens[: reply.new_tokens])).strip() == reply.text
        history.append((query, reply.text))


def turn_before(history):
    return history[-1][0], history[:-1]


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


def test_concurrent_replies_are_rows_of_one_batch_and_equal_single_replies(engine):
    queries = ["你好", "类型#上衣*材质#牛仔布", "介绍一下你自己", "再说一次"]
    adapters = [None, "runs/checkpoint-5", "runs/checkpoint-9", None]
    alone = [engine.reply(q, [], GREEDY, adapter=a).text for q, a in zip(queries, adapters)]
    widest = []
    step = engine.decoder.step

    def watching():
        widest.append(engine.decoder.rows)
        return step()

    engine.decoder.step = watching
    results = [None] * 4
    start = threading.Barrier(4)

    def ask(i):
        start.wait()
        results[i] = engine.reply(queries[i], [], GREEDY, adapter=adapters[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.text for r in results] == alone
    assert max(widest) > 1 and engine.info.max_batch >= 4
    assert all(r.prompt_tokens == len(engine.prompt_ids(q, [])) and r.finish_reason in ("stop", "length") for r, q in zip(results, queries))


def test_compare_any_two_adapters_with_a_seed_equals_two_replies(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=12)
    pair = ["runs/checkpoint-9", "runs/checkpoint-5"]
    _, done = collect(list(engine.compare("你好", [], params, adapters=pair, seed=5)))
    by_stream = {d.stream: d.reply for d in done}
    for i, name in enumerate(pair):
        assert by_stream[i].adapter == name
        assert by_stream[i].text == engine.reply("你好", [], params, adapter=name, seed=5).text


def test_stop_strings_end_the_reply_and_are_not_shown(engine):
    full = engine.reply("你好", [], SamplingParams(temperature=0, max_new_tokens=40)).text
    assert len(full) > 6
    stop = full[3:5]
    deltas, done = collect(list(engine.stream_completion("", SamplingParams(temperature=0, max_new_tokens=1), adapter=None)))
    assert done[0].reply.prompt_tokens == len(engine.tokenizer.encode(""))
    messages = [ChatMessage("user", "你好")]
    deltas, done = collect(list(engine.stream_messages(messages, SamplingParams(temperature=0, max_new_tokens=40), stop=[stop])))
    reply = done[0].reply
    assert reply.finish_reason == "stop" and stop not in reply.text and full.startswith(reply.text)
    assert "".join(d.text for d in deltas) == reply.text
    assert reply.text == full[: full.find(stop)].rstrip()


def test_messages_map_to_the_chatglm2_prompt(engine):
    history = [("你好", "你好，很高兴见到你。")]
    messages = [ChatMessage("system", "简短回答。"), ChatMessage("user", "你好"), ChatMessage("assistant", "你好，很高兴见到你。"),
                ChatMessage("user", "介绍一下你自己")]
    assert engine.tokenizer.build_chat_ids(messages) == engine.prompt_ids("简短回答。介绍一下你自己", history)
    assert engine.prompt_ids("介绍一下你自己", history, system="简短回答。") == engine.tokenizer.build_chat_ids(messages)
    assert to_messages("介绍一下你自己", history, "简短回答。") == messages
    with pytest.raises(BackendError, match="last message must be the user"):
        list(engine.stream_messages(messages[:-1], GREEDY))
    with pytest.raises(BackendError, match="user/assistant pairs"):
        list(engine.stream_messages([ChatMessage("assistant", "x"), ChatMessage("user", "y")], GREEDY))


def test_a_prompt_beyond_the_context_is_one_sentence_and_others_keep_running(engine):
    cancel = threading.Event()
    running = engine.stream_reply("你好", [], SamplingParams(temperature=0, max_new_tokens=200), cancel=cancel)
    first = next(running)
    with pytest.raises(BackendError, match="context"):
        engine.reply("长" * 2000, [], GREEDY)
    cancel.set()
    events = [first] + list(running)
    assert isinstance(events[-1], ReplyDone) and events[-1].reply.finish_reason == "cancelled" and events[-1].reply.stopped


def test_streamed_text_never_shows_half_a_character(engine):
    from backend.decode.text import ReplyText

    tok = engine.tokenizer
    byte_ids = [tok.sp_model.piece_to_id(f"<0x{b:02X}>") for b in "好的".encode("utf-8")]
    text = ReplyText(tok, [tok.eos_token_id], stop=["的"])
    deltas = [text.add(t) for t in byte_ids]
    assert deltas == ["", "", "好", "", "", ""] and text.hit_stop and text.finish() == ""


def test_what_the_decoder_chose_at_load_is_in_the_models_notices(model_dir, monkeypatch, capsys):
    """A decoder that had to choose for the user (a smaller cache: GPU memory is short) says so with a warning while
    it is made; the engine keeps it in ModelInfo.notices, which the app, the server and --prompt show once."""
    import warnings

    from backend import engine as engine_module
    from backend.cli import run_once
    from tui.__main__ import parse_args

    made = engine_module.make_batch_decoder
    notice = "GPU memory is short: the fast decoder keeps 2048 tokens of context per reply."

    def short_of_memory(*args, **kwargs):
        warnings.warn(notice, stacklevel=2)
        return made(*args, **kwargs)

    monkeypatch.setattr(engine_module, "make_batch_decoder", short_of_memory)
    engine = ChatEngine.load(str(model_dir), quantization="none", engine="eager", device="cpu")
    assert engine.info.notices == (notice,)
    engine.close()
    assert run_once(parse_args(["--model", str(model_dir), "--prompt", "你好", "--max-new-tokens", "2"])) == 0
    assert f"glmchat: {notice}" in capsys.readouterr().err


def test_warm_up_runs_the_decoders_on_its_thread_or_in_the_background(engine, caplog):
    """The eager decoder has nothing to warm (None); a decoder with ``warm_up`` gets it on the decoding thread,
    waited for or not; a background failure is logged and replies go on; a cache that had to shrink for memory
    is warmed in the background without captures (tuning only)."""
    assert engine.warm_up() is None and engine.warm_up(wait=False) is None
    threads = []
    engine.decoder.warm_up = lambda captures=True: threads.append(threading.current_thread() is engine.batcher._thread)
    assert engine.warm_up().done() and threads == [True]
    assert engine.warm_up(wait=False).result(10) is None and threads == [True, True]

    def failing():
        raise RuntimeError("CUDA out of memory")

    engine.decoder.warm_up = failing
    with caplog.at_level("WARNING", logger="glmchat.engine"):
        done = engine.warm_up(wait=False)
        assert isinstance(done.exception(10), RuntimeError)
        for _ in range(200):  # the future's callbacks run just after its waiters wake
            if "warm-up failed" in caplog.text:
                break
            threading.Event().wait(0.01)
    assert "warm-up failed (CUDA out of memory)" in caplog.text
    assert engine.reply("你好", [], GREEDY).new_tokens > 0
    engine.decoder.memory_short = True
    kinds = []
    engine.decoder.warm_up = lambda captures=True: kinds.append(captures)
    engine.warm_up(wait=False).result(10)
    engine.warm_up()
    assert kinds == [False, True]  # waited for (the server, before its first client): the whole warm-up
    engine.close()


def test_only_our_own_warnings_become_notices():
    """The app shows ``info.notices``; a library's deprecation warning raised while the decoder is built is not one."""
    import warnings
    from pathlib import Path

    import backend
    from backend.engine import own_notices

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warnings.warn_explicit("GPU memory is short: the fast decoder keeps 8304 tokens", UserWarning,
                               str(Path(backend.__file__).parent / "decode" / "fast_batch.py"), 203)
        warnings.warn_explicit("`torch.jit.script_method` is deprecated.", UserWarning, "/usr/lib/torch/jit/_script.py", 1)
        warnings.warn_explicit("GPU memory is short: the fast decoder keeps 8304 tokens", UserWarning,
                               str(Path(backend.__file__).parent / "decode" / "fast_batch.py"), 203)
    assert own_notices(said) == ("GPU memory is short: the fast decoder keeps 8304 tokens",)
