"""What survives a restart: sampling settings, the system prompt, adapters added in F4 (re-registered if
still on disk, one notice for those gone), the conversation that was open; a broken settings file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tui.preferences import PREFERENCES_FILE
from tui.screens.adapters import AdapterPicker
from tui.screens.conversations import ConversationsScreen
from tui.screens.settings import SettingsScreen

from fake_backend import write_checkpoint
from tui_testing import make_app, running, send, wait_until


async def test_settings_and_system_prompt_survive_a_restart(glmchat_dirs: Path):
    app = make_app()
    async with running(app) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#temperature").value = "0.25"
        app.screen.query_one("#max_new_tokens").value = "77"
        app.screen.query_one("#system").text = "Answer briefly."
        await pilot.click("#save")
        await wait_until(pilot, lambda: app.screen is app.chat)
    saved = json.loads((glmchat_dirs / "config" / PREFERENCES_FILE).read_text(encoding="utf-8"))
    assert saved["params"]["temperature"] == 0.25 and saved["system"] == "Answer briefly."

    again = make_app()
    async with running(again) as pilot:
        assert (again.params.temperature, again.params.max_new_tokens) == (0.25, 77)
        assert again.chat.conversation.system == "Answer briefly."
        await send(pilot, "hi")
        assert again.backend.calls[-1][1][2].max_new_tokens == 77

    flagged = make_app(["--temperature", "0.9"])  # a flag wins for its run, the rest stays as saved
    async with running(flagged):
        assert (flagged.params.temperature, flagged.params.max_new_tokens) == (0.9, 77)


async def test_adapters_added_in_the_app_come_back_and_a_missing_one_is_skipped_once(tmp_path: Path):
    kept, gone = write_checkpoint(tmp_path / "runs" / "a" / "checkpoint-5"), write_checkpoint(tmp_path / "runs" / "b" / "checkpoint-7")
    app = make_app()
    async with running(app) as pilot:
        for path in (kept, gone):
            await pilot.press("f4")
            await wait_until(pilot, lambda: isinstance(app.screen, AdapterPicker))
            app.screen.query_one("#adapter-path").value = str(path)
            app.screen.query_one("#adapter-path").focus()
            await pilot.press("enter")
            await wait_until(pilot, lambda: any(a.path == path for a in app.adapters), what=f"{path} added")
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.screen is app.chat)
    shutil.rmtree(gone)

    again = make_app()
    async with running(again) as pilot:
        await wait_until(pilot, lambda: [a.name for a in again.adapters] == ["a/checkpoint-5"], what="the re-registration")
        notices = [n.message for n in again._notifications if "no longer on disk" in n.message]
        assert len(notices) == 1 and str(gone) in notices[0]
    third = make_app()
    async with running(third) as pilot:
        await wait_until(pilot, lambda: third.adapters, what="the re-registration")
        assert not any("no longer on disk" in n.message for n in third._notifications), "said once, then forgotten"


async def test_command_line_adapters_are_not_remembered(checkpoints, glmchat_dirs: Path):
    async with running(make_app(["--adapter", str(checkpoints[0])])) as pilot:
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: pilot.app.backend.active_adapter is not None)
    saved = glmchat_dirs / "config" / PREFERENCES_FILE
    assert not saved.exists() or json.loads(saved.read_text(encoding="utf-8"))["adapters"] == []


async def test_the_open_conversation_reopens_not_the_latest():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "older topic")
        await pilot.press("ctrl+n")
        await send(pilot, "newer topic")
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: app.screen is app.chat)
        assert app.chat.conversation.turns[0].query == "older topic"
    again = make_app()
    async with running(again) as pilot:
        assert [t.query for t in again.chat.conversation.turns] == ["older topic"]
        await pilot.press("ctrl+n")
    fresh = make_app()
    async with running(fresh):
        assert fresh.chat.conversation.turns == [], "a new, empty conversation was open: it stays new"


async def test_a_broken_settings_file_is_one_notice_and_defaults(glmchat_dirs: Path):
    config = glmchat_dirs / "config"
    config.mkdir()
    (config / PREFERENCES_FILE).write_text('{"params": {"top_p": 7, "temperature": 0.5}, "adapters": 3}', encoding="utf-8")
    app = make_app()
    async with running(app):
        assert app.params.temperature == 0.5 and app.params.top_p == 0.8
        problems = [n.message for n in app._notifications if PREFERENCES_FILE in n.message]
        assert len(problems) == 1 and "top p 7" in problems[0]
    (config / PREFERENCES_FILE).write_text("{not json", encoding="utf-8")
    broken = make_app()
    async with running(broken):
        assert any("could not be read" in n.message for n in broken._notifications)


async def test_an_adapter_trained_in_f6_comes_back(tmp_path: Path):
    from test_tui_training import fill, open_panel

    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps({"content": f"类型#{i}", "summary": "好"}) for i in range(4)), encoding="utf-8")
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        fill(panel, train_file=data, output_dir=tmp_path / "out", max_steps=3, save_steps=3, logging_steps=1)
        await pilot.click("#start-run")
        await wait_until(pilot, lambda: panel.monitor.finished == "done", what="the run to finish")
        panel.monitor.query_one("#checkpoints").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.active_adapter == "out/checkpoint-3", what="chat with the checkpoint")
    again = make_app()
    async with running(again) as pilot:
        await wait_until(pilot, lambda: [a.name for a in again.adapters] == ["out/checkpoint-3"], what="the re-registration")
