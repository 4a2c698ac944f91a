"""The app on the real engine (backend.engine.ChatEngine through load_backend) with a tiny ChatGLM2
made here: streamed replies, the adapter hotkey, compare, an in-process training run, a bad adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers

from helpers_tiny import make_tiny_model_dir  # noqa: E402
from test_adapters import write_checkpoint  # noqa: E402

from tui.__main__ import parse_args  # noqa: E402
from tui.app import GLMChatApp  # noqa: E402
from tui.screens.training import TrainingScreen  # noqa: E402
from tui_testing import replies, running, send, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from backend.configuration import ChatGLMConfig

    root = tmp_path_factory.mktemp("real")
    model = make_tiny_model_dir(root / "model")
    ckpt = write_checkpoint(root / "runs" / "tiny" / "checkpoint-5", 4, config=ChatGLMConfig.from_pretrained(model), seed=1)
    return model, ckpt


def real_app(model: Path, *extra: str) -> GLMChatApp:
    return GLMChatApp(parse_args(["--model", str(model), "--quantization", "none", "--engine", "eager", *extra]))


async def set_greedy(app, pilot) -> None:
    app.params.temperature = 0.0
    app.params.max_new_tokens = 8


async def test_streamed_reply_hotkey_and_compare_on_the_real_engine(tiny):
    model, ckpt = tiny
    app = real_app(model, "--adapter", str(ckpt))
    async with running(app) as pilot:
        assert type(app.backend).__name__ == "ChatEngine"
        await set_greedy(app, pilot)
        await send(pilot, "你好")
        base = replies(app)[-1]
        expected = app.backend.reply("你好", [], app.params, adapter=None).text
        assert base.text == expected and base.record.adapter is None

        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.active_adapter == "tiny/checkpoint-5", what="the adapter switch")
        await send(pilot, "你好")
        tuned = replies(app)[-1]
        assert tuned.record.adapter == "tiny/checkpoint-5"
        history = [("你好", expected)]
        assert tuned.text == app.backend.reply("你好", history, app.params, adapter="tiny/checkpoint-5").text

        await pilot.press("f5")
        await send(pilot, "再见")
        left, right = replies(app)[-2:]
        assert (left.record.adapter, right.record.adapter) == (None, "tiny/checkpoint-5")
        assert left.text and right.text and left.text != right.text


async def test_training_panel_trains_on_the_real_engine_and_chats_with_the_checkpoint(tiny, tmp_path):
    model, _ = tiny
    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps({"content": f"类型#上衣*颜色#{c}", "summary": f"这件{c}上衣很好看。"})
                              for c in ("白色", "红色", "蓝色", "黑色")), encoding="utf-8")
    app = real_app(model)
    async with running(app) as pilot:
        await set_greedy(app, pilot)
        await pilot.press("f6")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training panel")
        panel = app.screen
        values = {"train_file": data, "output_dir": tmp_path / "out", "max_steps": 3, "save_steps": 3,
                  "logging_steps": 1, "pre_seq_len": 4, "gradient_accumulation_steps": 1}
        for name, value in values.items():
            panel.query_one(f"#train-{name}").value = str(value)
        await pilot.press("f7")
        await wait_until(pilot, lambda: panel.monitor.finished == "done", timeout=60, what="the real run")
        assert panel.monitor.checkpoints == [tmp_path / "out" / "checkpoint-3"]
        assert [s for s, _ in panel.monitor.losses] == [1, 2, 3]
        assert (tmp_path / "out" / "checkpoint-3" / "pytorch_model.bin").is_file()

        panel.monitor.query_one("#checkpoints").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat and app.active_adapter == "out/checkpoint-3",
                         what="the new checkpoint to become active")
        await send(pilot, "你好")
        assert replies(app)[-1].record.adapter == "out/checkpoint-3"


async def test_a_bad_adapter_path_shows_the_reason_instead_of_a_traceback(tiny, tmp_path):
    model, _ = tiny
    app = real_app(model, "--adapter", str(tmp_path / "missing"))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None, timeout=30, what="the load error")
        text = str(app.screen.query_one("#load-error").render())
        assert "no adapter checkpoint at" in text and "Traceback" not in text
        assert app.backend is None
