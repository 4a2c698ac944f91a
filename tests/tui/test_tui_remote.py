"""``glmchat --server URL``: the app against a real ``glmchat serve`` on 127.0.0.1 (a tiny ChatGLM2 made
here): streamed replies equal the engine's, stop frees the server's row, the adapter hotkey and picker,
compare as two concurrent streams, and the load screen's reasons for a wrong key or no server."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model and server helpers

from helpers_tiny import make_tiny_model_dir  # noqa: E402
from serving import EngineLog, load_engine, serving, wait_for  # noqa: E402
from test_adapters import write_checkpoint  # noqa: E402

from backend.service import SamplingParams  # noqa: E402
from tui.__main__ import parse_args  # noqa: E402
from tui.app import GLMChatApp  # noqa: E402
from tui.remote import RemoteBackend  # noqa: E402
from tui_testing import replies, running, send, wait_until  # noqa: E402

ADAPTER = "tiny/checkpoint-5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from backend.configuration import ChatGLMConfig

    root = tmp_path_factory.mktemp("remote")
    model = make_tiny_model_dir(root / "tiny")
    config = ChatGLMConfig.from_pretrained(model)
    ckpt = write_checkpoint(root / "runs" / "tiny" / "checkpoint-5", 4, config=config, seed=1)
    spare = write_checkpoint(root / "runs" / "later" / "checkpoint-9", 4, config=config, seed=2)
    engine = load_engine(model, ckpt)  # the real engine: 2 rows, 1 waiting
    yield engine, EngineLog(engine), spare
    engine.close()


@pytest.fixture
def server(tiny):
    with serving(tiny[0], api_key="k") as running_server:
        yield running_server


def remote_app(url: str, key: str = "k") -> GLMChatApp:
    return GLMChatApp(parse_args(["--server", url, "--api-key", key]))


def greedy(app: GLMChatApp, n: int) -> None:
    app.params.temperature = 0.0
    app.params.max_new_tokens = n


async def test_chat_adapter_switch_and_compare_through_the_server(server, tiny):
    engine = tiny[0]
    app = remote_app(server.url)
    async with running(app) as pilot:
        assert isinstance(app.backend, RemoteBackend)
        assert app.model_info.name == "tiny" and app.model_info.context_length == 512
        assert [a.name for a in app.adapters] == [ADAPTER]
        greedy(app, 8)
        await send(pilot, "你好")
        base = replies(app)[-1]
        expected = engine.reply("你好", [], SamplingParams(temperature=0, max_new_tokens=8), adapter=None).text
        assert base.text == expected and base.record.adapter is None and not base.record.stopped

        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter == ADAPTER, what="the adapter switch")
        await send(pilot, "再见")
        tuned = replies(app)[-1]
        history = [("你好", expected)]
        assert tuned.record.adapter == ADAPTER
        assert tuned.text == engine.reply("再见", history, SamplingParams(temperature=0, max_new_tokens=8), adapter=ADAPTER).text

        await pilot.press("f5")
        await send(pilot, "好")
        left, right = replies(app)[-2:]
        assert (left.record.adapter, right.record.adapter) == (None, ADAPTER)
        history.append(("再见", tuned.text))
        for view, adapter in ((left, None), (right, ADAPTER)):
            assert view.text == engine.reply("好", history, SamplingParams(temperature=0, max_new_tokens=8), adapter=adapter).text


def in_flight(url: str) -> int:
    import httpx

    return httpx.get(url + "/health").json()["replies_in_flight"]


async def test_esc_stops_a_reply_waiting_for_the_server_and_frees_its_row(server, tiny):
    engine, log = tiny[0], tiny[1]
    app = remote_app(server.url)
    async with running(app) as pilot:
        greedy(app, 400)
        with log.rows_taken():  # the server's rows hold long replies: this one waits for a row
            seen = len(log.streams)
            app.chat.prompt.value = "你好"
            app.chat.prompt.focus()
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.generation is not None and len(log.waiting()) == 1
                             and in_flight(server.url) == 1, timeout=30, what="the reply to wait on the server")
            await pilot.press("escape")
            # while the rows are still taken: the client shuts its connection, the server drops the request
            await wait_until(pilot, lambda: app.chat.generation is None, timeout=5, what="the reply to stop")
            assert replies(app)[-1].record.stopped
            stream = log.streams[seen]
            await wait_until(pilot, stream.is_cancelled, timeout=10, what="the server to cancel the waiting request")
            assert stream.row not in log.admitted  # it never took a row
        # (the held batcher drops it at its next step; the server's reply then ends)
        await wait_until(pilot, lambda: stream.finish_reason == "cancelled" and engine.decoder.rows == 0
                         and in_flight(server.url) == 0, timeout=30, what="the rows to be freed")


def test_a_stop_mid_stream_closes_it_and_the_server_cancels_the_row(server, tiny):
    import threading

    engine, log = tiny[0], tiny[1]
    remote = RemoteBackend.connect(server.url, api_key="k")
    cancel, seen, events = threading.Event(), len(log.streams), []
    with log.hold(steps=16):  # a few tokens, then the row stays mid-reply: it cannot finish before the stop
        for event in remote.stream_reply("你好", [], SamplingParams(temperature=0, max_new_tokens=400), cancel=cancel):
            events.append(event)
            cancel.set()  # after the first piece of text
        stream = log.streams[seen]
        wait_for(stream.is_cancelled, timeout=10, what="the server to cancel the row")
    done = events[-1].reply
    assert done.stopped and done.finish_reason == "cancelled" and done.text == events[0].text
    wait_for(lambda: stream.finish_reason is not None and engine.decoder.rows == 0, what="the row to be freed")
    assert stream.finish_reason == "cancelled"  # at most 16 of its 400 tokens were made: the cancel ended it
    wait_for(lambda: in_flight(server.url) == 0, what="the server's reply to end")
    remote.close()


async def test_the_training_screen_says_a_run_starts_on_the_server(server):
    """Against a server the model is not in this process: the New run tab says where training runs, and neither
    its button nor f7 starts a run here."""
    from test_tui_help_and_keys import footer_keys
    from textual.widgets import Button

    from tui.screens.training import TrainingScreen

    app = remote_app(server.url)
    async with running(app) as pilot:
        await pilot.press("f6")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training screen")
        await pilot.pause()
        where = str(app.screen.query_one("#train-where").render())
        assert server.url in where and "glmchat-train" in where
        assert app.screen.query_one("#start-run", Button).disabled
        assert "Start run" not in footer_keys(app)
        await pilot.press("f7")
        await pilot.pause()
        assert app.screen.mode is None and app.screen.monitor is not None


async def test_the_picker_registers_a_checkpoint_on_the_server(server, tiny):
    from tui.screens.adapters import AdapterPicker

    spare = tiny[2]
    app = remote_app(server.url)
    async with running(app) as pilot:
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, AdapterPicker), what="the adapter picker")
        path = app.screen.query_one("#adapter-path")
        path.value = str(spare.parent)  # a run directory on the server's disk: its checkpoints are scanned there
        path.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: "later/checkpoint-9" in [a.name for a in app.adapters], timeout=30,
                         what="the new adapter")
        assert "later/checkpoint-9" in [a.name for a in tiny[0].adapters()]


@pytest.mark.parametrize("case", ["wrong key", "no server"])
async def test_the_load_screen_says_why_it_cannot_connect(server, case):
    if case == "wrong key":
        app, says = remote_app(server.url, key="nope"), "refused the API key"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app, says = remote_app(f"http://127.0.0.1:{port}"), "cannot reach a glmchat server"
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None, timeout=30, what="the error")
        text = str(app.screen.query_one("#load-error").render())
        assert says in text and "Traceback" not in text
        assert app.backend is None


def test_server_mode_refuses_local_model_flags():
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--server", "http://127.0.0.1:1", "--model", "x"])
    assert exit_.value.code == 2
