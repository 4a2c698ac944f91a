"""``glmchat serve`` on a tiny ChatGLM2 made here, over real HTTP on 127.0.0.1: the official ``openai``
client (streamed and not), httpx, ``curl -N``; greedy replies equal ``glmchat --prompt``; bad requests,
the key, a full queue, a client that leaves, special-token text, run-time adapters, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny import make_tiny_model_dir  # noqa: E402
from serving import MAX_QUEUE, EngineLog, load_engine, serving, wait_for  # noqa: E402
from test_adapters import write_checkpoint  # noqa: E402

from backend.service import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "tiny/checkpoint-5"
HELLO = [{"role": "user", "content": "你好"}]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from backend.configuration import ChatGLMConfig

    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model_dir(root / "tiny")
    config = ChatGLMConfig.from_pretrained(model)
    ckpt = write_checkpoint(root / "runs" / "tiny" / "checkpoint-5", 4, config=config, seed=1)
    spare = write_checkpoint(root / "runs" / "later" / "checkpoint-9", 4, config=config, seed=2)
    return model, ckpt, spare


@pytest.fixture(scope="module")
def engine(tiny):
    model, ckpt, _ = tiny
    engine = load_engine(model, ckpt)  # the real engine: 2 rows, 1 waiting
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def log(engine):
    return EngineLog(engine)


@pytest.fixture(scope="module")
def server(engine, log):
    with serving(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def engine_reply(engine, n: int, adapter=None, query="你好") -> str:
    return engine.reply(query, [], greedy(n), adapter=adapter).text


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# ------------------------------------------------------------------ the wire format


def test_models_lists_the_base_and_every_adapter(server, tiny):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", f"tiny:{ADAPTER}"]
    assert data[0]["glmchat"]["context_length"] == 512 and data[0]["max_model_len"] == 512
    assert data[1]["adapter"] == {"name": ADAPTER, "path": str(tiny[1]), "pre_seq_len": 4, "prefix_projection": False}
    assert httpx.get(f"{server.url}/v1/models/tiny:{ADAPTER}").json()["parent"] == "tiny"


def test_openai_client_chat_whole_and_streamed_equal_the_engine(client, engine):
    expected = engine_reply(engine, 8)
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens == len(engine.prompt_ids("你好", []))

    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_the_model_field_picks_the_adapter_per_request(client, engine):
    tuned = client.chat.completions.create(model=f"tiny:{ADAPTER}", messages=HELLO, max_tokens=6, temperature=0)
    assert tuned.choices[0].message.content == engine_reply(engine, 6, adapter=ADAPTER)
    assert tuned.choices[0].message.content != engine_reply(engine, 6)


def test_a_system_message_and_history_reach_the_prompt(client, engine, log):
    messages = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好，很高兴见到你。"}, {"role": "user", "content": "再见"}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    expected = engine.prompt_ids("再见", [("你好", "你好，很高兴见到你。")], system="简短回答。")  # as the app asks
    assert log.prompts[-1] == expected


def test_content_as_text_parts_is_the_same_prompt(client, engine, log):
    parts = [{"type": "text", "text": "你"}, {"type": "text", "text": "好"}]
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=1)
    assert log.prompts[-1] == engine.prompt_ids("你好", [])


def test_raw_completions_stream_and_whole(client):
    whole = client.completions.create(model="tiny", prompt="类型#上衣", max_tokens=6, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="类型#上衣", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.completion_tokens == 6 and whole.object == "text_completion"


def test_a_stop_string_ends_the_reply_before_it(client, engine):
    full = engine_reply(engine, 12)
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    ask = lambda: client.chat.completions.create(  # noqa: E731
        model="tiny", messages=HELLO, max_tokens=6, temperature=1.0, top_p=0.95, seed=7).choices[0].message.content
    assert ask() == ask()


def test_curl_streams_server_sent_events(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-X", "POST", server.url + "/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=120)
    events = [line for line in out.stdout.splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_greedy_reply_through_the_server_equals_glmchat_prompt(client, tiny):
    model = tiny[0]
    cli = subprocess.run([sys.executable, "-m", "tui", "--model", str(model), "--quantization", "none", "--engine", "eager",
                          "--prompt", "你好", "--temperature", "0", "--max-new-tokens", "10"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    served = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, temperature=0)
    assert served.choices[0].message.content == cli.stdout.rstrip("\n")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, None),
    ({"model": "nope", "messages": HELLO}, 404, "model", "model_not_found"),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, 400, None, None),
    ({"messages": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "x"}]}, 400, "messages", None),
    ({"messages": [{"role": "wizard", "content": "y"}]}, 400, "messages.0.role", None),
    ({"messages": HELLO, "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    ({"messages": HELLO, "n": 2}, 400, "n", None),
    ({"messages": HELLO, "temperature": -1}, 400, "temperature", None),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content", None),
])
def test_bad_requests_get_openai_error_objects(server, body, status, param, code):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    assert_error(httpx.post(server.url + "/v1/chat/completions", **kwargs), status, param, code)


def test_an_oversized_body_gets_413_and_the_server_keeps_serving(engine):
    with serving(engine, max_body_bytes=1000) as small:
        big = {"messages": [{"role": "user", "content": "长" * 2000}]}
        assert_error(httpx.post(small.url + "/v1/chat/completions", json=big), 413, code="request_too_large")
        chunked = (part for part in [json.dumps(big).encode()[:600], json.dumps(big).encode()[600:]])  # no Content-Length
        assert_error(httpx.post(small.url + "/v1/chat/completions", content=chunked,
                                headers={"Content-Type": "application/json"}), 413, code="request_too_large")
        ok = httpx.post(small.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_prompt_past_the_context_is_a_400(server):
    long = {"messages": [{"role": "user", "content": "类型#上衣" * 200}], "max_tokens": 4}
    error = assert_error(httpx.post(server.url + "/v1/chat/completions", json=long), 400)
    assert "512" in error["message"]


def test_special_token_text_from_a_client_stays_text(client, engine, log):
    tokenizer = engine.tokenizer
    controls = set(tokenizer.special_ids.values())
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "[gMASK]<|user|>sop [MASK] eop"}],
                                   max_tokens=1, temperature=0)
    ids = log.prompts[-1]
    assert ids[:2] == tokenizer.get_prefix_tokens()  # the format's own [gMASK] sop, once
    assert not controls & set(ids[2:])
    client.completions.create(model="tiny", prompt="<|user|>[gMASK]sop", max_tokens=1, temperature=0)
    assert not controls & set(log.prompts[-1][2:])


# ------------------------------------------------------------------ key, queue, disconnect, adapters


def test_the_api_key_guards_everything_but_health(engine):
    with serving(engine, api_key="s3cret") as keyed:
        assert httpx.get(keyed.url + "/health").status_code == 200
        assert_error(httpx.get(keyed.url + "/v1/models"), 401, code="invalid_api_key")
        assert_error(httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.post(keyed.url + "/v1/chat/completions", json={"messages": HELLO}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices[0].message.role == "assistant"


def test_adapters_register_at_run_time_behind_the_key(engine, tiny):
    spare = tiny[2]
    with serving(engine, api_key="k") as keyed:
        url, auth = keyed.url + "/v1/adapters", {"Authorization": "Bearer k"}
        assert_error(httpx.post(url, json={"path": str(spare)}), 401)
        assert_error(httpx.post(url, json={"path": str(spare.parent / "missing")}, headers=auth), 400, "path")
        added = httpx.post(url, json={"path": str(spare.parent)}, headers=auth)  # a run directory: scanned
        assert added.status_code == 200 and [m["id"] for m in added.json()["data"]] == ["tiny:later/checkpoint-9"]
        ids = [m["id"] for m in httpx.get(keyed.url + "/v1/models", headers=auth).json()["data"]]
        assert "tiny:later/checkpoint-9" in ids
        reply = httpx.post(keyed.url + "/v1/chat/completions", headers=auth, json={
            "model": "tiny:later/checkpoint-9", "messages": HELLO, "max_tokens": 4, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == engine_reply(engine, 4, adapter="later/checkpoint-9")


def _in_thread(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _in_flight(url: str) -> int:
    return httpx.get(url + "/health").json()["replies_in_flight"]


def test_a_full_queue_answers_429_and_frees_up_after(server, log):
    answers = []
    with log.rows_taken():  # both of the engine's rows hold long replies, held still
        queued = _in_thread(lambda: answers.append(httpx.post(server.url + "/v1/chat/completions", timeout=120,
                                                              json={"messages": HELLO, "max_tokens": 2})))
        wait_for(lambda: len(log.waiting()) == MAX_QUEUE, what="the request to wait for a row")
        error = assert_error(httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}), 429,
                             code="server_busy")
        assert "busy" in error["message"]
    queued.join(120)
    assert answers[0].status_code == 200  # the waiting one is answered once a row is free
    assert answers[0].json()["usage"]["completion_tokens"] == 2
    wait_for(lambda: _in_flight(server.url) == 0, what="the replies to end")
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_while_queued_is_cancelled_before_it_gets_a_row(server, log):
    with log.rows_taken():
        seen = len(log.streams)
        with pytest.raises(httpx.ReadTimeout):  # waits behind the taken rows, then gives up
            httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "stream": True}, timeout=1.0)
        wait_for(lambda: len(log.streams) > seen, what="the request to reach the engine")
        queued = log.streams[seen]
        wait_for(queued.is_cancelled, timeout=10, what="the queued request's cancel, while it still waits")
    wait_for(lambda: queued.finish_reason == "cancelled", what="the queued request to end")
    assert queued.row not in log.admitted  # it never took a row
    wait_for(lambda: _in_flight(server.url) == 0, what="the replies to end")


def _first_chunk(url: str, body: dict) -> None:
    """Stream ``body`` and drop the connection right after the first chunk."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        next(response.iter_lines())


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, engine, log):
    seen = len(log.streams)
    with log.hold(steps=16):  # a few tokens (the first text may take more than one), then the row stays mid-reply
        _first_chunk(server.url, {"messages": HELLO, "max_tokens": 400, "temperature": 0, "stream": True})
        stream = log.streams[seen]
        wait_for(stream.is_cancelled, timeout=10, what="the request's cancel event")
    wait_for(lambda: stream.finish_reason is not None, what="the row to be dropped")
    assert stream.finish_reason == "cancelled"  # at most 16 of its 400 tokens were made: the cancel ended it
    wait_for(lambda: engine.decoder.rows == 0 and _in_flight(server.url) == 0, what="the row to be freed")


def test_a_prompt_that_fills_the_context_ends_with_length(client, engine):
    """The engine caps the reply at the context (max_tokens itself is within it): finish_reason "length"."""
    prompt_tokens = len(engine.prompt_ids("你好", []))
    room = engine.info.context_length - prompt_tokens
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=engine.info.context_length,
                                           temperature=0)
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == room else "stop")
    assert reply.usage.completion_tokens <= room


# ------------------------------------------------------------------ the command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_on_a_kept_alive_connection_are_not_held_by_nagle(server):
    """Clients (the openai package, httpx, browsers) reuse a connection. With Nagle's algorithm on the server's
    sockets each response after the first waited for the client's delayed ACK: /health took 44 ms, not 0.4."""
    import statistics
    import time

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            got = b""
            while not (b"\r\n\r\n" in got and got.endswith(b"}")):
                got += conn.recv(65536)
            times.append(time.perf_counter() - start)
    assert statistics.median(times[1:]) < 0.025, [round(t * 1000, 1) for t in times]  # a delayed ACK is >= 40 ms


def test_the_listening_socket_turns_nagle_off_for_its_connections():
    from backend.server.runner import bind

    with bind("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP  # what asyncio checks before it sets TCP_NODELAY itself
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_serve_refuses_a_taken_port_and_warns_about_an_open_address():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        run = subprocess.run([sys.executable, "-m", "tui", "serve", "--demo", "--host", "0.0.0.0", "--port", port],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "WARNING" in run.stderr and "--api-key" in run.stderr
    assert f"cannot listen on 0.0.0.0:{port}" in run.stderr and "Traceback" not in run.stderr
    missing = subprocess.run([sys.executable, "-m", "tui", "serve"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--model" in missing.stderr


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_a_stop_signal_lets_a_running_stream_finish_then_exits_0(tiny, stop_signal):
    port = _free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serving.py"), "--model", str(tiny[0]),
                                "--quantization", "none", "--engine", "eager", "--port", str(port), "--drain-seconds", "60"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()[1]
                return False

        wait_for(up, timeout=180, what="the server to come up")
        body = {"messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(stop_signal)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def test_the_engines_own_busy_refusal_is_a_429_and_its_other_refusals_400():
    from backend.server.errors import from_backend
    from backend.service import BackendError, BusyError

    busy = from_backend(BusyError("every row is taken and the queue is full; try again shortly."))
    assert (busy.status, busy.code) == (429, "server_busy") and "queue is full" in busy.message
    assert from_backend(BackendError("the prompt is too long.")).status == 400


def test_a_reply_holding_unicode_line_separators_stays_one_sse_data_line():
    """U+2028, U+0085 and the like end a line for str.splitlines (httpx's aiter_lines): they go out escaped."""
    from backend.server.replies import _event
    from backend.server.schemas import Completion, CompletionChoice

    text = "a\u2028b\u2029c\x85d\x1ce\n"
    event = _event(Completion(id="x", model="m", choices=[CompletionChoice(text=text, finish_reason=None)]))
    line = event.removesuffix("\n\n")
    assert line.splitlines() == [line]
    assert json.loads(line.removeprefix("data: "))["choices"][0]["text"] == text


def test_the_engine_streams_through_the_event_loop_with_no_thread_per_reply(client, engine):
    """ChatEngine's replies reach the server on its event loop: no pump thread a request (the blocking path
    stays for other backends)."""
    import threading

    stream = client.chat.completions.create(model="tiny", messages=HELLO, stream=True, temperature=0, max_tokens=6)
    first = next(iter(stream))
    assert not [t for t in threading.enumerate() if t.name == "glmchat-reply"]
    text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == engine_reply(engine, 6)


@pytest.mark.parametrize("fmt_name", ["chat", "completion"])
def test_text_events_from_the_template_equal_pydantic_dumps(fmt_name):
    """Byte for byte, but for the time stamp: the text chunks of a reply carry the time its template was made."""
    import random
    import re

    from backend.server import schemas
    from backend.server.replies import ChatFormat, CompletionFormat, DeltaEvents, _event

    if fmt_name == "chat":
        fmt = ChatFormat("m", schemas.ChatCompletionRequest(model="m", messages=HELLO, stream=True))
    else:
        fmt = CompletionFormat("m", schemas.CompletionRequest(model="m", prompt="hi", stream=True))
    events = DeltaEvents(fmt)
    alphabet = "ab 你好\"\\\n\r\t\b\f\x01\x1f\x7f\u2028\u2029\x85😀</s>'" + "".join(map(chr, range(32)))
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        stamp = re.compile(r'"created":\d+')
        assert stamp.sub("", events(text)) == stamp.sub("", _event(fmt.delta(text))), repr(text)


def test_the_server_runs_with_a_short_gil_switch_interval(monkeypatch):
    """The event loop shares the GIL with the decoding thread: while serving, CPython's 5 ms switch interval is
    0.5 ms (at 64 streams on the H200 the 5 ms interval held new requests back: bench/NOTES.md, run 13)."""
    import uvicorn

    from backend.server import runner

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    with runner.bind("127.0.0.1", 0) as sock:
        assert runner.run(object(), sock) == 0
    assert seen == [pytest.approx(runner.GIL_SWITCH_MS / 1000)] and runner.GIL_SWITCH_MS <= 1
    assert sys.getswitchinterval() == before
