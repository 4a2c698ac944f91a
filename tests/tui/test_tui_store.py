"""The SQLite store: turns with adapter and settings per reply, transactions, corrupt files set aside."""

from __future__ import annotations

import sqlite3

import pytest

from backend.service import SamplingParams
from tui.conversation import Conversation, ReplyRecord, Turn
from tui.export import conversation_markdown, write_export
from tui.store import ConversationStore, StoreError


def _turn(query: str, *adapters, stopped=False) -> Turn:
    params = SamplingParams(temperature=0.3, max_new_tokens=64)
    last = len(adapters) - 1  # stopped: the last reply only
    return Turn(query, [ReplyRecord(f"{a or 'base'} says {query}", a, params, stopped and i == last, 4, 0.5)
                        for i, a in enumerate(adapters)])


def _add(store: ConversationStore, conversation: Conversation, turn: Turn) -> None:
    conversation.turns.append(turn)
    store.save_turn(conversation, turn)


def test_turns_round_trip_with_adapter_and_settings(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    conversation = Conversation(title="first")
    _add(store, conversation, _turn("hi", None))
    _add(store, conversation, _turn("compare", None, "run/checkpoint-600", stopped=True))
    store.close()

    loaded = ConversationStore.in_dir(tmp_path).load(conversation.id)
    assert loaded.title == "first"
    assert [t.query for t in loaded.turns] == ["hi", "compare"]
    assert [r.adapter for r in loaded.turns[1].replies] == [None, "run/checkpoint-600"]
    assert loaded.turns[1].replies[1].stopped and not loaded.turns[0].replies[0].stopped
    assert loaded.turns[0].replies[0].params == SamplingParams(temperature=0.3, max_new_tokens=64)
    # the right column continues the history in compare mode
    assert loaded.history() == [("hi", "base says hi"), ("compare", "run/checkpoint-600 says compare")]


def test_replace_and_delete_turns(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    conversation = Conversation(title="t")
    _add(store, conversation, _turn("one", None))
    _add(store, conversation, _turn("two", None))
    last = conversation.turns[-1]
    last.replies = _turn("two", "a/checkpoint-1").replies
    store.replace_replies(conversation, last)
    assert [r.adapter for r in store.load(conversation.id).turns[1].replies] == ["a/checkpoint-1"]

    store.delete_turn(conversation.turns[0])
    assert [t.query for t in store.load(conversation.id).turns] == ["two"]
    summary = store.conversations()[0]
    assert (summary.title, summary.turns, summary.adapters) == ("t", 1, ("a/checkpoint-1",))


def test_failed_write_rolls_back(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    conversation = Conversation(title="t")
    _add(store, conversation, _turn("one", None))
    store._conn.execute("DROP TABLE replies")  # the next insert fails half way through its transaction
    turn = _turn("two", None)
    conversation.turns.append(turn)
    with pytest.raises(StoreError):
        store.save_turn(conversation, turn)
    rows = store._conn.execute("SELECT query FROM turns").fetchall()
    assert rows == [("one",)]  # the turn row of the failed save was rolled back too


def test_corrupt_database_is_set_aside_not_dropped(tmp_path):
    path = tmp_path / ConversationStore.FILENAME
    garbage = b"this is not sqlite" * 100
    path.write_bytes(garbage)
    store = ConversationStore.in_dir(tmp_path)
    assert store.set_aside is not None and store.set_aside.name.startswith("conversations.db.corrupt-")
    assert store.set_aside.read_bytes() == garbage
    assert store.conversations() == []  # a fresh, working database
    store.close()
    sqlite3.connect(path).execute("SELECT * FROM conversations")


def test_markdown_export_names_adapters_and_settings(tmp_path):
    conversation = Conversation(title="Ads / 广告", id=7)
    conversation.turns = [_turn("写一条广告", None, "adgen/checkpoint-600", stopped=True)]
    text = conversation_markdown(conversation, model="THUDM/chatglm2-6b")
    assert text.startswith("# Ads / 广告\n")
    assert "## 1. You\n\n写一条广告" in text
    assert "### ChatGLM2 (base · temperature 0.3 · top_p 0.8 · max 64 tokens)" in text
    assert "### ChatGLM2 (adgen/checkpoint-600 · temperature 0.3 · top_p 0.8 · max 64 tokens · stopped)" in text
    path = write_export(tmp_path, conversation)
    assert path.name == "7-Ads-广告.md" and path.read_text(encoding="utf-8") == conversation_markdown(conversation)
