"""The app on a tiny ChatGLM3 (real engine): the status bar names the variant, ctrl+g opens the structure panel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny-model helpers

from test_families import make_chatglm3_dir  # noqa: E402

from tui.__main__ import parse_args  # noqa: E402
from tui.app import GLMChatApp  # noqa: E402
from tui.screens.structure import StructureScreen  # noqa: E402
from tui.widgets.status_bar import StatusBar  # noqa: E402
from tui_testing import running, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def glm3_32k(tmp_path_factory):
    path = make_chatglm3_dir(tmp_path_factory.mktemp("glm3") / "model")
    config = json.loads((path / "config.json").read_text())
    config.update(_name_or_path="THUDM/chatglm3-6b-32k", rope_ratio=50)
    (path / "config.json").write_text(json.dumps(config))
    return path


async def test_status_bar_and_structure_panel_name_the_family(glm3_32k):
    app = GLMChatApp(parse_args(["--model", str(glm3_32k), "--quantization", "none", "--engine", "eager"]))
    async with running(app) as pilot:
        assert (app.model_info.family, app.model_info.variant) == ("chatglm3", "chatglm3-6b-32k")
        assert "chatglm3-6b-32k" in str(app.query_one(StatusBar).render())
        await pilot.press("ctrl+g")
        await wait_until(pilot, lambda: isinstance(app.screen, StructureScreen), what="the structure panel")
        text = app.screen.query_one("#structure-text")
        await wait_until(pilot, lambda: "Rotary" in str(text.render()), what="the structure text")
        page = str(text.render())
        assert "500000 (10000 x rope_ratio 50)" in page and "float32 (ChatGLM3)" in page and "key/value groups    2" in page
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.chat, what="the chat again")
