"""The app's reply view never shows "\ufffd" for a character split across tokens, on the real engine."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers

from helpers_tiny import make_tiny_model_dir  # noqa: E402
from test_stream_characters import TEXT, ScriptedDecoder  # noqa: E402
from test_tui_real_engine import real_app  # noqa: E402

from backend.decode.batcher import Batcher  # noqa: E402
from tui.widgets.reply import ReplyView  # noqa: E402
from tui_testing import replies, running, send, wait_until  # noqa: E402


async def test_streamed_reply_shows_whole_characters(tmp_path, monkeypatch):
    shown: list[str] = []
    real_append = ReplyView.append

    async def recording_append(self, text):  # every delta the view is given while streaming
        shown.append(text)
        await real_append(self, text)

    monkeypatch.setattr(ReplyView, "append", recording_append)
    app = real_app(make_tiny_model_dir(tmp_path / "model"))
    async with running(app) as pilot:
        ids = app.backend.tokenizer.encode(TEXT, add_special_tokens=False)
        app.params.max_new_tokens = len(ids) - 1  # the last character is cut after two of its bytes
        scripted = Batcher(ScriptedDecoder(ids))  # the engine's decoding thread, over a scripted decoder
        monkeypatch.setattr(app.backend, "batcher", scripted)
        await send(pilot, "你好")
        await wait_until(pilot, lambda: replies(app)[-1].record is not None)
        scripted.close()
        view = replies(app)[-1]
        assert shown and not any("\ufffd" in s for s in shown)
        assert view.text == TEXT[:-1].rstrip() and "\ufffd" not in view.text
