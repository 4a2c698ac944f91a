"""SVG snapshots of the screens whose look matters (pytest --snapshot-update after a deliberate change)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from textual.widgets import Input, TextArea

from backend.service import LoadProgress
from tui.__main__ import parse_args
from tui.app import GLMChatApp
from tui.screens.training import TrainingScreen

from fake_backend import FakeBackend, write_checkpoint
from tui_testing import make_app, ready, send, wait_until


@pytest.fixture(autouse=True)
def steady(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No cursor blink, and relative paths that read the same on every machine."""
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    monkeypatch.setattr(TextArea, "_toggle_cursor_blink_visible", lambda self: None)
    monkeypatch.chdir(tmp_path)
    write_checkpoint(Path("output/adgen/checkpoint-600"))
    write_checkpoint(Path("output/adgen/checkpoint-1200"))
    Path("train.json").write_text(json.dumps({"content": "类型#裙", "summary": "好看"}) + "\n", encoding="utf-8")
    return tmp_path


ADAPTERS = ["--adapters", "output/adgen"]


async def _ready(pilot) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: ready(app) and app.chat.query_one("#status").gpu_memory is not None)


async def _settle(pilot) -> None:
    pilot.app.clear_notifications()
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()


def test_chat_with_code_and_adapter(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await send(pilot, "write code")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: pilot.app.backend.active_adapter is not None)
        await send(pilot, "and a slogan")
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(100, 30))


def test_compare_mode_wide(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f5")
        await send(pilot, "compare code")
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(200, 50))


def test_loading_stages(snap_compare):
    gate = threading.Event()

    def loader(args, progress):
        progress(LoadProgress("tokenizer", message="tokenizer.model"))
        progress(LoadProgress("weights", 3, 7, "pytorch_model-00003-of-00007.bin"))
        gate.wait(10)
        return FakeBackend.load("fake", None, [], [], progress)

    async def run_before(pilot):
        await wait_until(pilot, lambda: "3/7" in str(pilot.app.screen.query_one("#stages").render()))

    app = GLMChatApp(parse_args(["--model", "THUDM/chatglm2-6b"]), loader=loader)
    try:
        assert snap_compare(app, run_before=run_before, terminal_size=(100, 30))
    finally:
        gate.set()


def test_loading_failure(snap_compare):
    async def run_before(pilot):
        await wait_until(pilot, lambda: getattr(pilot.app.screen, "problem", None) is not None)

    assert snap_compare(make_app(["--model", "./missing-model"]), run_before=run_before, terminal_size=(100, 30))


def test_training_monitor(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f6")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, TrainingScreen))
        panel = pilot.app.screen
        for name, value in dict(train_file="train.json", output_dir="output/run", max_steps=40, save_steps=20).items():
            panel.query_one(f"#train-{name}").value = str(value)
        await pilot.click("#start-run")
        await wait_until(pilot, lambda: panel.monitor.finished == "done")
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(100, 30))


def test_training_form(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f6")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, TrainingScreen))
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(100, 30))


@pytest.mark.parametrize("key", ["f1", "f2", "f4"])
def test_dialogs(snap_compare, key):
    async def run_before(pilot):
        await _ready(pilot)
        await send(pilot, "hello")
        await pilot.press(key)
        await pilot.pause()
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(100, 30))


@pytest.mark.parametrize("key", ["", "f6", "f2"])
def test_narrow_terminal(snap_compare, key):
    """80x24: the whole footer, the training form's fields and the settings' buttons readable."""

    async def run_before(pilot):
        await _ready(pilot)
        await send(pilot, "hello")
        if key:
            await pilot.press(key)
            await wait_until(pilot, lambda: pilot.app.screen is not pilot.app.chat)
        await _settle(pilot)

    assert snap_compare(make_app(ADAPTERS), run_before=run_before, terminal_size=(80, 24))
