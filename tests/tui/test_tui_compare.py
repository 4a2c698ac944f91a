"""Compare mode: each prompt answered by two adapters side by side."""

from __future__ import annotations

from textual.containers import Horizontal

from fake_backend import canned_reply
from tui_testing import make_app, replies, running, send, wait_until


A600 = "adgen/checkpoint-600"


async def test_compare_streams_base_and_adapter_side_by_side(checkpoints):
    app = make_app(["--adapter", str(checkpoints[0])], token_delay=0.002)
    async with running(app) as pilot:
        await send(pilot, "plain")
        await pilot.press("f5")
        assert app.compare_mode and app.compare_pair() == (None, A600)
        assert "compare" in str(app.chat.query_one("#status").render())
        await send(pilot, "compare code")
        left, right = replies(app)[1:]
        assert left.parent is right.parent and isinstance(left.parent, Horizontal)
        history = [("plain", canned_reply("plain", None, 1))]
        assert (left.text, right.text) == (canned_reply("compare code", None, 2), canned_reply("compare code", A600, 2))
        assert (left.record.adapter, right.record.adapter) == (None, A600)
        assert app.backend.calls[-1] == ("compare", ("compare code", history, app.params, [None, A600], None))
        stored = app.store.load(app.chat.conversation.id).turns[1]
        assert [r.adapter for r in stored.replies] == [None, A600]

        await pilot.press("f5")  # off again: the next prompt continues from the right column's answer
        await send(pilot, "next")
        assert not app.compare_mode and len(replies(app)) == 4
        assert app.backend.calls[-1][1][1][-1] == ("compare code", canned_reply("compare code", A600, 2))


async def test_escape_stops_both_columns(checkpoints):
    app = make_app(["--adapter", str(checkpoints[0])], token_delay=0.005)
    async with running(app) as pilot:
        await pilot.press("f5")
        app.chat.prompt.value = "long compare"
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(replies(app)) == 2 and all(len(r.text) > 10 for r in replies(app)))
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat.generation is None)
        assert all(r.record.stopped for r in replies(app))


async def test_compare_needs_an_adapter():
    app = make_app()
    async with running(app) as pilot:
        await pilot.press("f5")
        assert not app.compare_mode
        assert any("Compare needs an adapter" in n.message for n in app._notifications)
