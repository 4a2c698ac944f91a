"""Adapter switching: the hotkey, the picker (with add from disk), the command palette, bad paths."""

from __future__ import annotations

from textual.command import CommandList

from tui.screens.adapters import AdapterPicker

from fake_backend import canned_reply, write_checkpoint
from tui_testing import make_app, replies, running, send, wait_until


A600, A1200 = "adgen/checkpoint-600", "adgen/checkpoint-1200"


async def test_hotkey_cycles_adapters_and_the_next_reply_is_tagged(checkpoints):
    app = make_app(["--adapters", str(checkpoints[0].parent)])
    async with running(app) as pilot:
        assert [a.name for a in app.adapters] == [A600, A1200] and app.active_adapter is None
        await send(pilot, "before")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter == A600, what="the backend to switch")
        assert app.active_adapter == A600 and A600 in str(app.chat.query_one("#status").render())
        await send(pilot, "after")
        first, second = replies(app)
        assert (first.record.adapter, second.record.adapter) == (None, A600)
        assert A600 in str(second.query_one(".reply-header").render())
        assert second.text == canned_reply("after", A600, 2)
        # the conversation stays: the history went to the adapter
        assert app.backend.calls[-1][1][1] == [("before", canned_reply("before", None, 1))]
        await pilot.press("ctrl+t", "ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter is None)
        assert app.active_adapter is None
        switches = [args[0] for name, args in app.backend.calls if name == "switch_adapter"]
        assert switches[-3:] == [A600, A1200, None]


async def test_cycle_without_adapters_says_how_to_add_one():
    app = make_app()
    async with running(app) as pilot:
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.active_adapter is None
        assert any("No adapters registered" in n.message for n in app._notifications)


async def test_picker_chooses_and_adds_from_disk(checkpoints, tmp_path):
    app = make_app(["--adapter", str(checkpoints[0])])
    async with running(app) as pilot:
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, AdapterPicker))
        picker = app.screen
        picker.query_one("#adapter-path").value = str(tmp_path / "nowhere")
        await pilot.click("#add-adapter")
        await wait_until(pilot, lambda: "No P-Tuning checkpoint" in str(picker.query_one("#adapter-error").render()),
                         what="the bad path error")
        assert [a.name for a in app.adapters] == [A600]

        run = tmp_path / "other-run"
        write_checkpoint(run / "checkpoint-5")
        picker.query_one("#adapter-path").value = str(run)  # a run dir: its checkpoints are scanned
        picker.query_one("#adapter-path").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(app.adapters) == 2, what="the new checkpoint")
        assert app.adapters[1].name == "other-run/checkpoint-5"
        listing = picker.query_one("#adapter-list")
        assert listing.get_option_at_index(listing.highlighted).id == "other-run/checkpoint-5"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat and app.backend.active_adapter == "other-run/checkpoint-5")
        await send(pilot, "hi")
        assert replies(app)[0].record.adapter == "other-run/checkpoint-5"


async def test_command_palette_switches_adapter(checkpoints):
    app = make_app(["--adapter", str(checkpoints[0]), "--adapter", str(checkpoints[1])])
    async with running(app) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"use adapter: adgen/checkpoint-1200")
        hits = lambda: [str(o.prompt) for o in app.screen.query_one(CommandList).options]  # noqa: E731
        await wait_until(pilot, lambda: any("Use adapter: adgen/checkpoint-1200" in h for h in hits()),
                         what="the palette to list the adapter")
        await pilot.press("down")
        await wait_until(pilot, lambda: app.screen.query_one(CommandList).highlighted is not None)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.backend.active_adapter == A1200, what="the palette command")


async def test_bad_adapter_path_on_the_command_line_is_explained(tmp_path):
    app = make_app(["--adapter", str(tmp_path / "missing-ckpt")])
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "problem", None) is not None, what="the load error")
        text = str(app.screen.query_one("#load-error").render())
        assert "Could not load the model" in text and "No P-Tuning checkpoint at" in text
        assert "missing-ckpt" in text and "Traceback" not in text
        assert app.backend is None and app.chat.prompt.disabled


async def test_picker_shows_the_source_prefix_chat_applies(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ads" / "checkpoint-9", source_prefix="广告：")
    app = make_app(["--adapter", str(ckpt)])
    async with running(app) as pilot:
        await pilot.press("f4")
        await wait_until(pilot, lambda: isinstance(app.screen, AdapterPicker))
        listing = app.screen.query_one("#adapter-list")
        assert "prefix “广告：”" in str(listing.get_option_at_index(1).prompt)
        assert "prefix “" not in str(listing.get_option_at_index(0).prompt)
