"""The loading screen: stages with progress, and failures explained instead of a traceback."""

from __future__ import annotations

import sys
import threading
import types

import pytest

from backend.service import LoadProgress
from tui.__main__ import parse_args
from tui.app import GLMChatApp, load_backend
from tui.screens.loading import LoadingScreen

from fake_backend import FakeBackend
from tui_testing import make_app, wait_until


async def test_stages_show_while_loading_then_the_prompt_opens():
    gate = threading.Event()

    def slow_loader(args, progress):
        progress(LoadProgress("tokenizer"))
        progress(LoadProgress("weights", 2, 7, "pytorch_model-00002-of-00007.bin"))
        gate.wait(5)
        return FakeBackend.load("fake", None, [], [], progress)

    app = GLMChatApp(parse_args([]), loader=slow_loader)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, LoadingScreen) and "Weights" in str(
            app.screen.query_one("#stages").render()), what="the weights stage")
        screen = app.screen
        stages = str(screen.query_one("#stages").render())
        assert "✓ Tokenizer" in stages and "▸ Weights 2/7" in stages
        assert screen.query_one("#load-progress").percentage == pytest.approx(2 / 7)
        assert app.chat.prompt.disabled
        gate.set()
        await wait_until(pilot, lambda: app.screen is app.chat and not app.chat.prompt.disabled)
        assert app.chat.prompt.has_focus


def _engine_module(load) -> types.ModuleType:
    module = types.ModuleType("backend.engine")
    module.ChatEngine = type("ChatEngine", (), {"load": staticmethod(load)})
    return module


class _LoadedEngine:
    def __init__(self):
        self.warm_ups = []

    def warm_up(self, wait=True):
        self.warm_ups.append(wait)


def test_load_backend_maps_the_command_line_and_warms_the_decoder_in_the_background(monkeypatch):
    seen, loaded = {}, _LoadedEngine()

    def load(model, quantization, adapters, adapter_dirs, progress, demo=False, engine="eager", dtype=None):
        seen.update(model=model, quantization=quantization, adapters=adapters, adapter_dirs=adapter_dirs,
                    demo=demo, engine=engine, dtype=dtype)
        return loaded

    monkeypatch.setitem(sys.modules, "backend.engine", _engine_module(load))
    args = parse_args(["--quantization", "none", "--adapter", "a", "--adapters", "d", "--engine", "fast", "--dtype", "fp16"])
    assert load_backend(args, lambda p: None) is loaded
    assert seen == dict(model="THUDM/chatglm2-6b", quantization="none", adapters=["a"], adapter_dirs=["d"],
                        demo=False, engine="fast", dtype="fp16")
    assert loaded.warm_ups == [False]  # not waited for: the app is ready while the GPU decoder warms up

    load_backend(parse_args(["--demo", "--quantization", "8bit"]), lambda p: None)
    assert seen == dict(model=None, quantization="8bit", adapters=[], adapter_dirs=[], demo=True, engine="auto", dtype=None)


async def test_out_of_memory_is_explained_with_a_fix(monkeypatch):
    class OutOfMemoryError(RuntimeError):
        pass

    def load(**_):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 214.00 MiB")

    monkeypatch.setitem(sys.modules, "backend.engine", _engine_module(load))
    app = GLMChatApp(parse_args(["--model", "THUDM/chatglm2-6b"]))  # the real load_backend
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None)
        text = str(app.screen.query_one("#load-error").render())
        assert "The GPU ran out of memory." in text and "--quantization 8bit or 4bit" in text
        assert "Traceback" not in text


async def test_unexpected_error_points_to_the_log_and_retry_works(glmchat_dirs):
    attempts = []

    def flaky(args, progress):
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("shard 3 is truncated")
        return FakeBackend.load("fake", None, [], [], progress)

    app = GLMChatApp(parse_args([]), loader=flaky)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None)
        text = str(app.screen.query_one("#load-error").render())
        log = glmchat_dirs / "data" / "glmchat.log"
        assert "Unexpected error: ValueError: shard 3 is truncated." in text and str(log) in text
        assert "Traceback" in log.read_text(encoding="utf-8")
        await pilot.press("r")
        await wait_until(pilot, lambda: app.screen is app.chat and app.backend is not None, what="the retry")
        assert len(attempts) == 2


async def test_missing_model_dir_says_what_to_pass(tmp_path):
    app = make_app(["--model", str(tmp_path / "no-such-model")])
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None)
        assert "pass --model a directory" in str(app.screen.query_one("#load-error").render())
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 1, "q quits from the failure screen, with a failure status"


async def test_a_config_of_the_wrong_shape_is_a_notice_not_a_traceback(tmp_path):
    """The real loader on a model directory whose config.json is valid JSON but a list."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("[]", encoding="utf-8")
    app = GLMChatApp(parse_args(["--model", str(model)]))  # the real load_backend and engine
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None, timeout=60)
        text = str(app.screen.query_one("#load-error").render())
        assert "config.json holds a list where a JSON object" in text and "download the model again" in text
        assert "Traceback" not in text and "Unexpected error" not in text


async def test_what_the_engine_chose_at_load_is_a_notice():
    """The engine says what it chose for the user (a smaller cache when GPU memory is short) in ModelInfo.notices;
    the app shows each as a notice once the model is up (a warning printed to stderr would be lost under the TUI)."""
    from backend.service import ModelInfo

    notice = "GPU memory is short: the fast decoder keeps 10255 tokens of context per reply."
    info = ModelInfo("fake/chatglm2-6b", "4bit", "cuda:0", "fast", notices=(notice,))
    app = GLMChatApp(parse_args([]), loader=lambda args, progress: FakeBackend(info=info))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: app.backend is not None and not app.chat.prompt.disabled, what="the load")
        await wait_until(pilot, lambda: [n.message for n in app._notifications] == [notice], what="the notice")
