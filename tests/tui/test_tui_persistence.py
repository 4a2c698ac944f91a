"""Conversations survive a restart, can be reopened, exported; a corrupt database is set aside, a newer one read."""

from __future__ import annotations

from pathlib import Path

from backend.service import SamplingParams
from tui.conversation import Conversation, ReplyRecord, Turn
from tui.screens.conversations import ConversationsScreen
from tui.store import SCHEMA_VERSION, ConversationStore

from fake_backend import canned_reply
from tui_testing import make_app, replies, running, send, wait_until


A600 = "adgen/checkpoint-600"


async def test_a_conversation_survives_a_restart(checkpoints):
    argv = ["--adapter", str(checkpoints[0]), "--temperature", "0.3"]
    app = make_app(argv)
    async with running(app) as pilot:
        await send(pilot, "first")
        await pilot.press("ctrl+t")
        await wait_until(pilot, lambda: app.backend.active_adapter == A600)
        await send(pilot, "second")

    again = make_app(argv)
    async with running(again) as pilot:
        turns = again.chat.conversation.turns
        assert [t.query for t in turns] == ["first", "second"]
        assert [t.answer.adapter for t in turns] == [None, A600]
        assert turns[1].answer.params.temperature == 0.3
        assert [r.text for r in replies(again)] == [canned_reply("first", None, 1), canned_reply("second", A600, 2)]
        assert A600 in str(replies(again)[1].query_one(".reply-header").render())
        await send(pilot, "third")  # the reopened conversation continues, with its history
        assert again.backend.calls[-1][1][1] == [(t.query, t.answer.text) for t in turns[:2]]
        assert len(again.store.load(again.chat.conversation.id).turns) == 3


async def test_history_screen_reopens_and_exports(glmchat_dirs: Path):
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "old topic")
        await pilot.press("ctrl+n")
        await send(pilot, "new topic")
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        listing = app.screen.query_one("#conversation-list")
        assert listing.option_count == 2
        assert "new topic" in str(listing.get_option_at_index(0).prompt)
        await pilot.press("down", "ctrl+s")
        exported = sorted((glmchat_dirs / "data" / "exports").glob("*.md"))
        assert len(exported) == 1 and "old topic" in exported[0].read_text(encoding="utf-8")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat)
        assert [t.query for t in app.chat.conversation.turns] == ["old topic"]
        await send(pilot, "follow up")
        assert app.backend.calls[-1][1][1] == [("old topic", canned_reply("old topic", None, 1))]


async def test_delete_asks_twice(glmchat_dirs: Path):
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "doomed")
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.press("delete")
        assert len(app.store.conversations()) == 1
        await pilot.press("delete")
        await pilot.pause()
        assert app.store.conversations() == [] and app.chat.conversation.turns == []


async def test_export_from_the_chat(glmchat_dirs: Path):
    app = make_app()
    async with running(app) as pilot:
        await pilot.press("ctrl+s")
        assert any("Nothing to export" in n.message for n in app._notifications)
        await send(pilot, "write code")
        await pilot.press("ctrl+s")
        [path] = (glmchat_dirs / "data" / "exports").glob("*.md")
        text = path.read_text(encoding="utf-8")
        assert "## 1. You\n\nwrite code" in text and "```python" in text and "(base · temperature 0.8" in text


async def test_corrupt_database_is_reported_and_set_aside(glmchat_dirs: Path):
    data = glmchat_dirs / "data"
    data.mkdir(parents=True)
    (data / ConversationStore.FILENAME).write_bytes(b"\x00garbage" * 512)
    app = make_app()
    async with running(app) as pilot:
        [aside] = data.glob("conversations.db.corrupt-*")
        assert aside.read_bytes() == b"\x00garbage" * 512
        assert any(str(aside) in n.message for n in app._notifications)
        await send(pilot, "still works")
        assert len(app.store.conversations()) == 1


async def test_a_newer_database_opens_read_only_with_a_notice(glmchat_dirs: Path):
    data = glmchat_dirs / "data"
    data.mkdir(parents=True)
    store = ConversationStore.in_dir(data)
    conversation = Conversation(title="from a newer glmchat")
    turn = Turn("later", [ReplyRecord("an answer", None, SamplingParams(), False, 2, 0.1)])
    conversation.turns.append(turn)
    store.save_turn(conversation, turn)
    store._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()

    app = make_app()
    async with running(app) as pilot:
        assert any("newer glmchat" in n.message and "read-only" in n.message for n in app._notifications)
        assert [t.query for t in app.chat.conversation.turns] == ["later"]  # the history is there to read
        await send(pilot, "not saved")
        assert not any(n.title == "Not saved" for n in app._notifications)  # one notice, not one per turn
    assert not list(data.glob("conversations.db.corrupt-*"))
    again = ConversationStore.in_dir(data)
    assert again.read_only and [len(again.load(c.id).turns) for c in again.conversations()] == [1]
