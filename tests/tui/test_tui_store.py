"""The SQLite store: turns with adapter and settings per reply, transactions, corrupt files set aside."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backend.service import SamplingParams
from tui.conversation import Conversation, ReplyRecord, Turn
from tui.export import conversation_markdown, write_export
from tui.store import MIGRATIONS, SCHEMA_VERSION, ConversationStore, StoreError

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_page_damaged_after_opening_is_named_not_moved(tmp_path):
    """Corruption found by a read (the open reads only the header): a sentence saying what to do; the file is
    in use, possibly by another glmchat, so it is not moved under it."""
    store = ConversationStore.in_dir(tmp_path)
    for i in range(20):
        _add(store, Conversation(title=f"t{i}"), _turn("q" * 500, None))
    store.close()
    path = tmp_path / ConversationStore.FILENAME
    data = bytearray(path.read_bytes())
    for offset in range(3 * 4096, len(data) - 4096, 4096):  # every page after the schema's
        data[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))

    damaged = ConversationStore.in_dir(tmp_path)
    with pytest.raises(StoreError, match="it is damaged .*move the file elsewhere"):
        [damaged.load(c.id) for c in damaged.conversations()]
    assert damaged.set_aside is None and path.exists()


def _user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def _other_process(script: str, *args: str, wait: bool = True):
    """Run ``script`` (Python, with the repository importable) in a separate process; its last line is JSON."""
    command = [sys.executable, "-c", script, *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


OPEN_AND_LIST = """
import json, sys
from pathlib import Path
from tui.store import ConversationStore
store = ConversationStore.in_dir(Path(sys.argv[1]))
print(json.dumps({"set_aside": str(store.set_aside) if store.set_aside else None,
                  "titles": [c.title for c in store.conversations()]}))
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])  # delete: a file an older glmchat created
def test_a_busy_database_is_not_corrupt(tmp_path, journal):
    """The issue's recipe: one connection holds BEGIN IMMEDIATE with a row inserted while another process opens
    the store; the file used to be renamed .corrupt-* and the held conversation lost."""
    store = ConversationStore.in_dir(tmp_path)
    conversation = Conversation(title="committed")
    _add(store, conversation, _turn("one", None))
    store.close()
    path = tmp_path / ConversationStore.FILENAME
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute(f"PRAGMA journal_mode = {journal}")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO conversations (title, created_at, updated_at) VALUES ('held', 0, 0)")

    opened = _other_process(OPEN_AND_LIST, str(tmp_path))
    holder.execute("COMMIT")
    holder.close()

    assert opened == {"set_aside": None, "titles": ["committed"]}
    assert not list(tmp_path.glob("*.corrupt-*"))
    assert sorted(c.title for c in ConversationStore.in_dir(tmp_path).conversations()) == ["committed", "held"]


WRITE_MANY = """
import json, sys, time
from pathlib import Path
from backend.service import SamplingParams
from tui.conversation import Conversation, ReplyRecord, Turn
from tui.store import ConversationStore
directory, name, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(directory / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while len(list(directory.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # start together
    time.sleep(0.001)
store = ConversationStore.in_dir(directory)  # both may create the file at once
for i in range(count):
    conversation = Conversation(title=f"{name}-{i}")
    turn = Turn(f"{name} asks {i}", [ReplyRecord(f"{name} answer {i}", None, SamplingParams(), False, 3, 0.1)])
    conversation.turns.append(turn)
    store.save_turn(conversation, turn)
print(json.dumps({"set_aside": str(store.set_aside) if store.set_aside else None}))
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    count = 60
    writers = [_other_process(WRITE_MANY, str(tmp_path), name, str(count), wait=False) for name in ("a", "b")]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"set_aside": None}
    store = ConversationStore.in_dir(tmp_path)
    summaries = store.conversations()
    assert sorted(s.title for s in summaries) == sorted(f"{n}-{i}" for n in "ab" for i in range(count))
    assert all(s.turns == 1 for s in summaries)
    assert not list(tmp_path.glob("*.corrupt-*"))
    replies = store._conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    assert replies == 2 * count


def test_a_database_from_a_newer_glmchat_is_read_only_and_never_moved(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    conversation = Conversation(title="from the future")
    _add(store, conversation, _turn("hello", None))
    store._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()
    path = tmp_path / ConversationStore.FILENAME

    newer = ConversationStore.in_dir(tmp_path)
    assert newer.read_only and newer.set_aside is None
    assert "newer glmchat" in newer.notice and "update glmchat" in newer.notice
    assert [c.title for c in newer.conversations()] == ["from the future"]
    assert newer.load(conversation.id).turns[0].query == "hello"
    turn = _turn("not saved", None)
    conversation.turns.append(turn)
    with pytest.raises(StoreError, match="read-only"):
        newer.save_turn(conversation, turn)
    newer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
    assert _user_version(path) == SCHEMA_VERSION + 1  # untouched: never migrated down


class _NextVersionStore(ConversationStore):
    """The store of a glmchat one schema version ahead of this one."""

    MIGRATIONS = MIGRATIONS + (("ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0",),)


def test_the_previous_version_is_migrated_with_its_conversations(tmp_path):
    store = ConversationStore.in_dir(tmp_path)  # a database of the current (soon previous) version
    conversation = Conversation(title="old")
    _add(store, conversation, _turn("kept", None, "a/checkpoint-1"))
    store.close()

    upgraded = _NextVersionStore.in_dir(tmp_path)
    assert _user_version(tmp_path / ConversationStore.FILENAME) == SCHEMA_VERSION + 1
    assert upgraded._conn.execute("SELECT title, pinned FROM conversations").fetchall() == [("old", 0)]
    assert [r.adapter for r in upgraded.load(conversation.id).turns[0].replies] == [None, "a/checkpoint-1"]


def test_a_failing_migration_changes_nothing(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    _add(store, Conversation(title="intact"), _turn("q", None))
    store.close()

    class BrokenStep(ConversationStore):
        MIGRATIONS = MIGRATIONS + (("ALTER TABLE conversations ADD COLUMN pinned INTEGER", "ALTER TABLE nope ADD x"),)

    with pytest.raises(StoreError, match="no such table: nope"):
        BrokenStep.in_dir(tmp_path)
    path = tmp_path / ConversationStore.FILENAME
    assert _user_version(path) == SCHEMA_VERSION
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(conversations)")]
    assert "pinned" not in columns and not list(tmp_path.glob("*.corrupt-*"))
    assert [c.title for c in ConversationStore.in_dir(tmp_path).conversations()] == ["intact"]


def test_a_fresh_database_gets_every_migration_and_wal(tmp_path):
    store = ConversationStore.in_dir(tmp_path)
    assert _user_version(tmp_path / ConversationStore.FILENAME) == SCHEMA_VERSION == len(MIGRATIONS)
    assert store._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


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
