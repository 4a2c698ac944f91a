"""Conversations in SQLite: one transaction per change, a corrupt file set aside, never dropped."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .conversation import Conversation, ReplyRecord, Turn, params_from_dict, params_to_dict

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    query TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    id INTEGER PRIMARY KEY,
    turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
    column INTEGER NOT NULL,
    text TEXT NOT NULL,
    adapter TEXT,
    stopped INTEGER NOT NULL,
    new_tokens INTEGER NOT NULL,
    seconds REAL NOT NULL,
    params TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns(conversation_id, position);
CREATE INDEX IF NOT EXISTS replies_by_turn ON replies(turn_id, column);
"""
# Step n takes a database from user_version n+1 to n+2 (SCHEMA above is version 1); append, never edit.
MIGRATIONS: tuple[str, ...] = (
    "ALTER TABLE conversations ADD COLUMN system TEXT NOT NULL DEFAULT '';",  # 2: a system prompt per conversation
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    updated_at: float
    turns: int
    adapters: tuple[str, ...]  # distinct adapters that replied; "base" for the base model


class StoreError(Exception):
    """The database could not be read or written; the message says which file and why."""


class ConversationStore:
    FILENAME = "conversations.db"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set_aside: Optional[Path] = None  # where a corrupt database was moved, if one was
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError:
            self.set_aside = _set_aside(path)
            self._conn = self._connect()

    @classmethod
    def in_dir(cls, directory: Path) -> "ConversationStore":
        return cls(directory / cls.FILENAME)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than {SCHEMA_VERSION}")
            conn.execute("PRAGMA foreign_keys = ON")
            steps = " ".join(MIGRATIONS[max(version, 1) - 1:])
            conn.executescript(f"BEGIN; {SCHEMA} {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self._conn.close()

    # -- writes: each one transaction -------------------------------------------------

    def save_turn(self, conversation: Conversation, turn: Turn) -> None:
        """Append ``turn`` (with its replies) to ``conversation``, creating the conversation on first use."""
        now = time.time()
        with self._write() as conn:
            if conversation.id is None:
                cur = conn.execute(
                    "INSERT INTO conversations (title, system, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (conversation.title, conversation.system, conversation.created_at, now),
                )
                conversation.id = cur.lastrowid
            else:  # the title follows an edited first prompt
                conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (conversation.title, conversation.id))
            position = conversation.turns.index(turn)
            cur = conn.execute(
                "INSERT INTO turns (conversation_id, position, query) VALUES (?, ?, ?)",
                (conversation.id, position, turn.query),
            )
            turn.id = cur.lastrowid
            self._insert_replies(conn, turn)
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation.id))
        conversation.updated_at = now

    def replace_replies(self, conversation: Conversation, turn: Turn) -> None:
        """Store regenerated replies of a saved turn in place of the old ones."""
        if turn.id is None:
            return self.save_turn(conversation, turn)
        now = time.time()
        with self._write() as conn:
            conn.execute("DELETE FROM replies WHERE turn_id = ?", (turn.id,))
            self._insert_replies(conn, turn)
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation.id))
        conversation.updated_at = now

    def delete_turn(self, turn: Turn) -> None:
        if turn.id is None:
            return
        with self._write() as conn:
            conn.execute("DELETE FROM turns WHERE id = ?", (turn.id,))
        turn.id = None

    def update_details(self, conversation: Conversation) -> None:
        """Store a new title or system prompt of a saved conversation (an unsaved one keeps them until its first turn)."""
        if conversation.id is None:
            return
        with self._write() as conn:
            conn.execute(
                "UPDATE conversations SET title = ?, system = ? WHERE id = ?",
                (conversation.title, conversation.system, conversation.id),
            )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    @staticmethod
    def _insert_replies(conn: sqlite3.Connection, turn: Turn) -> None:
        conn.executemany(
            "INSERT INTO replies (turn_id, column, text, adapter, stopped, new_tokens, seconds, params)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (turn.id, column, r.text, r.adapter, int(r.stopped), r.new_tokens, r.seconds,
                 json.dumps(params_to_dict(r.params)))
                for column, r in enumerate(turn.replies)
            ],
        )

    def _write(self) -> "_Transaction":
        return _Transaction(self)

    # -- reads -----------------------------------------------------------------------

    def conversations(self, search: str = "") -> list[ConversationSummary]:
        """All conversations, most recently updated first; with ``search``, those whose title or a prompt contains it."""
        where, args = "", ()
        if search.strip():
            pattern = "%" + search.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where = (" WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id"
                     " AND t.query LIKE ? ESCAPE '\\')")
            args = (pattern, pattern)
        rows = self._read(
            "SELECT c.id, c.title, c.updated_at,"
            " (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id),"
            " (SELECT GROUP_CONCAT(DISTINCT COALESCE(r.adapter, 'base')) FROM replies r"
            "  JOIN turns t ON r.turn_id = t.id WHERE t.conversation_id = c.id)"
            " FROM conversations c" + where + " ORDER BY c.updated_at DESC, c.id DESC",
            args,
        )
        return [
            ConversationSummary(id_, title, updated, count, tuple(sorted((adapters or "").split(",")) if adapters else ()))
            for id_, title, updated, count, adapters in rows
        ]

    def exists(self, conversation_id: int) -> bool:
        return bool(self._read("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)))

    def latest_id(self) -> Optional[int]:
        rows = self._read("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1")
        return rows[0][0] if rows else None

    def load(self, conversation_id: int) -> Conversation:
        rows = self._read("SELECT title, system, created_at, updated_at FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise StoreError(f"Conversation {conversation_id} is not in {self.path}.")
        title, system, created, updated = rows[0]
        turns: dict[int, Turn] = {}
        for turn_id, query in self._read(
            "SELECT id, query FROM turns WHERE conversation_id = ? ORDER BY position, id", (conversation_id,)
        ):
            turns[turn_id] = Turn(query=query, id=turn_id)
        for turn_id, text, adapter, stopped, new_tokens, seconds, params in self._read(
            "SELECT r.turn_id, r.text, r.adapter, r.stopped, r.new_tokens, r.seconds, r.params FROM replies r"
            " JOIN turns t ON r.turn_id = t.id WHERE t.conversation_id = ? ORDER BY r.turn_id, r.column",
            (conversation_id,),
        ):
            turns[turn_id].replies.append(
                ReplyRecord(text, adapter, params_from_dict(json.loads(params)), bool(stopped), new_tokens, seconds)
            )
        return Conversation(list(turns.values()), title, conversation_id, created, updated, system)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"Could not read {self.path}: {err}.") from err


class _Transaction:
    """``with store._write() as conn``: commit on success, roll back and raise StoreError on failure."""

    def __init__(self, store: ConversationStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._conn.execute("BEGIN IMMEDIATE")
        return self._store._conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        conn = self._store._conn
        if exc_type is None:
            conn.execute("COMMIT")
            return False
        conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"Could not save to {self._store.path}: {exc}.") from exc
        return False


def _set_aside(path: Path) -> Path:
    """Rename a corrupt database (and its journal files) to <name>.corrupt-<timestamp>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(target)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target
