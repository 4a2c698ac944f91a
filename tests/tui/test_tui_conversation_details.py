"""Conversations: a system prompt each (F2, stored with them), rename and search in F3, titles from the
first prompt (also after an edit), "(1 turn)", and a version-1 database migrated in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tui.conversation import Conversation, title_for
from tui.screens.conversations import ConversationsScreen
from tui.screens.settings import SettingsScreen
from tui.store import MIGRATIONS, SCHEMA_VERSION, ConversationStore

from test_tui_store import _add, _turn
from tui_testing import make_app, running, send, wait_until


def test_a_version_1_database_gains_the_system_column_and_keeps_its_history(tmp_path: Path):
    path = tmp_path / ConversationStore.FILENAME
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:  # the version-1 schema, as a glmchat of that version wrote it
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('old', 1, 1)")
    conn.commit()
    conn.close()
    store = ConversationStore(path)
    assert store.set_aside is None
    [summary] = store.conversations()
    assert store.load(summary.id).title == "old" and store.load(summary.id).system == ""
    assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_system_prompt_and_title_round_trip_and_search(tmp_path: Path):
    store = ConversationStore.in_dir(tmp_path)
    poem = Conversation(title="a poem", system="You answer in verse.")
    _add(store, poem, _turn("write about rain", None))
    ads = Conversation(title="ads")
    _add(store, ads, _turn("类型#裙*颜色#红色", None))
    _add(store, ads, _turn("50%_off", None))
    assert store.load(poem.id).system == "You answer in verse."
    poem.title, poem.system = "rain poem", "Short verse."
    store.update_details(poem)
    again = ConversationStore.in_dir(tmp_path).load(poem.id)
    assert (again.title, again.system) == ("rain poem", "Short verse.")
    assert [s.title for s in store.conversations("RAIN")] == ["rain poem"]  # title or prompt, any case
    assert [s.title for s in store.conversations("红色")] == ["ads"]
    assert [s.title for s in store.conversations("50%_")] == ["ads"]
    assert store.conversations("r%n") == [] and store.conversations("5_%") == []  # wildcards are literal
    assert len(store.conversations("  ")) == 2


def test_titles_summarise_the_first_prompt():
    assert title_for("  write\n a   poem ") == "write a poem"
    long = "please write a short poem about the autumn rain falling on the old city walls"
    assert title_for(long) == "please write a short poem about the autumn rain…"
    assert len(title_for("类" * 100)) == 48


async def test_system_prompt_from_f2_goes_to_the_backend_and_stays_with_the_conversation():
    app = make_app()
    async with running(app) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#system").text = "You are terse."
        await pilot.click("#save")
        await wait_until(pilot, lambda: app.screen is app.chat)
        await send(pilot, "hello")
        assert app.backend.calls[-1][1][4] == "You are terse."
        saved = app.store.load(app.chat.conversation.id)
        assert saved.system == "You are terse."
        await pilot.press("ctrl+n")
        assert app.chat.conversation.system == "You are terse.", "new conversations start with the default"
        app.chat.conversation.system = ""
        await send(pilot, "plain")
        assert app.backend.calls[-1][1][4] is None, "no system prompt: none is passed"

        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.press("down", "enter")  # the older one, with its own system prompt
        await wait_until(pilot, lambda: app.screen is app.chat)
        await send(pilot, "again")
        assert app.backend.calls[-1][1][4] == "You are terse."


async def test_rename_and_search_in_f3():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "write about rain")
        await pilot.press("ctrl+n")
        await send(pilot, "slogan for a red dress")
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        screen = app.screen
        listing = screen.query_one("#conversation-list")
        assert "(1 turn)" not in str(listing.get_option_at_index(0).prompt) and " 1 turn " in str(listing.get_option_at_index(0).prompt)
        await pilot.press("f2")
        rename = screen.query_one("#conversation-rename")
        assert rename.has_focus and rename.value == "slogan for a red dress"
        rename.value = "Dress ads"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "Dress ads" in str(listing.get_option_at_index(0).prompt))
        assert app.chat.conversation.title == "Dress ads"
        await pilot.press("ctrl+f", *"rain")
        await wait_until(pilot, lambda: listing.option_count == 1)
        assert "write about rain" in str(listing.get_option_at_index(0).prompt)
        await pilot.press("enter")  # from the search field to the list
        assert listing.has_focus
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat)
        assert app.chat.conversation.turns[0].query == "write about rain"
    titles = [s.title for s in ConversationStore.in_dir(app.data_dir).conversations()]
    assert sorted(titles) == ["Dress ads", "write about rain"]


async def test_editing_the_only_prompt_retitles_the_conversation():
    app = make_app()
    async with running(app) as pilot:
        await send(pilot, "helo wrold")
        await pilot.press("ctrl+l")
        assert app.chat.prompt.value == "helo wrold"
        app.chat.prompt.value = "hello world"
        await send(pilot, "hello world")
        assert app.chat.conversation.title == "hello world"
        assert app.store.load(app.chat.conversation.id).title == "hello world"


async def test_reopen_notice_says_1_turn(glmchat_dirs: Path):
    async with running(make_app()) as pilot:
        await send(pilot, "only one")
    again = make_app()
    async with running(again):
        messages = [n.message for n in again._notifications]
        assert any("(1 turn)" in m for m in messages), messages
