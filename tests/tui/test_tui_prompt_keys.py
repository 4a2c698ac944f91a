"""The prompt: app keys work while it has focus (also when remapped onto an editing key), it takes
several lines (Enter sends, the newline key breaks a line) and grows with its text."""

from __future__ import annotations

from pathlib import Path

from tui.screens.help import HelpScreen

from test_tui_help_and_keys import footer_keys
from tui_testing import make_app, running, wait_until


async def test_ctrl_k_from_config_switches_adapter_while_typing(glmchat_dirs: Path, checkpoints):
    config = glmchat_dirs / "config"
    config.mkdir()
    (config / "config.toml").write_text('[keys]\nnext_adapter = "ctrl+k"\n', encoding="utf-8")
    app = make_app(["--adapter", str(checkpoints[0])])
    async with running(app) as pilot:
        prompt = app.chat.prompt
        prompt.value = "half a question"
        prompt.move_cursor((0, 4))
        assert app.focused is prompt
        await pilot.press("ctrl+k")  # the text area's own ctrl+k deletes to the end of the line
        await wait_until(pilot, lambda: app.backend.active_adapter == "adgen/checkpoint-600", what="the switch")
        assert prompt.value == "half a question", "the key went to the app, not to the text"
        assert "^k" in footer_keys(app) and "Adapter" in footer_keys(app)


async def test_help_lists_the_newline_key(checkpoints):
    app = make_app(["--adapter", str(checkpoints[0])])
    async with running(app) as pilot:
        assert app.focused is app.chat.prompt
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter is not None)
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        rows = {name: key for key, _what, name in app.screen.rows() if name}
        assert rows["newline"] == "^j / shift+⏎"


async def test_newline_key_then_enter_sends_both_lines():
    app = make_app()
    async with running(app) as pilot:
        prompt = app.chat.prompt
        one_line = prompt.outer_size.height
        await pilot.press(*"first", "ctrl+j", *"second", "shift+enter", *"third")
        assert prompt.value == "first\nsecond\nthird"
        await wait_until(pilot, lambda: prompt.outer_size.height == one_line + 2, what="the prompt to grow")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat.conversation.turns and app.chat.generation is None)
        assert app.chat.conversation.turns[0].query == "first\nsecond\nthird"
        assert prompt.value == ""
        await wait_until(pilot, lambda: prompt.outer_size.height == one_line, what="the prompt to shrink")


async def test_prompt_stops_growing_at_its_max_height():
    app = make_app()
    async with running(app) as pilot:
        prompt = app.chat.prompt
        prompt.value = "\n".join(f"line {i}" for i in range(30))
        await pilot.pause()
        assert prompt.outer_size.height == 8
