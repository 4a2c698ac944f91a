"""Conversations in SQLite: one transaction per change, shared safely by several glmchats; versioned
migrations; a corrupt file set aside (never dropped), a newer glmchat's file opened read-only (never moved)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .conversation import Conversation, ReplyRecord, Turn, params_from_dict, params_to_dict

BUSY_TIMEOUT_S = 5.0  # how long a write waits for another glmchat's transaction before giving up

# MIGRATIONS[n] takes a database from user_version n to n + 1; the pending steps and the version bump
# run in one transaction. Append a step for every schema change; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1: the first schema ("IF NOT EXISTS": a file created before versioning holds these tables already)
        """CREATE TABLE IF NOT EXISTS conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS turns (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            query TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS replies (
            id INTEGER PRIMARY KEY,
            turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
            column INTEGER NOT NULL,
            text TEXT NOT NULL,
            adapter TEXT,
            stopped INTEGER NOT NULL,
            new_tokens INTEGER NOT NULL,
            seconds REAL NOT NULL,
            params TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns(conversation_id, position)",
        "CREATE INDEX IF NOT EXISTS replies_by_turn ON replies(turn_id, column)",
    ),
    (  # 1 -> 2: a system prompt per conversation
        "ALTER TABLE conversations ADD COLUMN system TEXT NOT NULL DEFAULT ''",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


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
    """One SQLite file shared by every running glmchat: WAL (readers never wait for a writer), a busy timeout
    for writers, and a corrupt file told apart from a busy one (only corruption sets a file aside)."""

    FILENAME = "conversations.db"
    MIGRATIONS = MIGRATIONS

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set_aside: Optional[Path] = None  # where a corrupt database was moved, if one was
        self.newer_version: Optional[int] = None  # the schema of a newer glmchat's file, opened read-only
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as err:
            if not _is_corrupt(err, path):
                raise _store_error(err, path, "open") from err
            self.set_aside = _set_aside(path)
            try:
                self._conn = self._open()
            except sqlite3.DatabaseError as again:
                raise _store_error(again, path, "open") from again

    @classmethod
    def in_dir(cls, directory: Path) -> "ConversationStore":
        return cls(directory / cls.FILENAME)

    @property
    def read_only(self) -> bool:
        return self.newer_version is not None

    @property
    def notice(self) -> Optional[str]:
        """What the app should tell the user about how the database was opened, if anything."""
        if self.set_aside is not None:
            return (f"The conversations database was corrupt; it was moved to {self.set_aside} "
                    "and a new one started.")
        if self.read_only:
            return (f"{self.path} was written by a newer glmchat (schema {self.newer_version}; this one knows "
                    f"{len(self.MIGRATIONS)}): conversations are shown read-only and new ones are not saved, "
                    "so update glmchat to keep saving.")
        return None

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)  # transactions are explicit
        try:
            version = _user_version(conn)  # the first read: a file that is not SQLite fails here
            if version > len(self.MIGRATIONS):
                conn.close()
                self.newer_version = version
                return _connect_read_only(self.path)
            _use_wal(conn)
            conn.execute("PRAGMA foreign_keys = ON")
            if version < len(self.MIGRATIONS):
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the pending MIGRATIONS and bump user_version, all in one transaction (all or nothing)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn)  # again, under the write lock: another glmchat may have migrated
            if version > len(self.MIGRATIONS):
                raise StoreError(f"{self.path} was just upgraded by a newer glmchat; restart this one to read it.")
            for step in self.MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {len(self.MIGRATIONS)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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
            raise _store_error(err, self.path, "read") from err


class _Transaction:
    """``with store._write() as conn``: commit on success, roll back and raise StoreError on failure."""

    def __init__(self, store: ConversationStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        store = self._store
        if store.read_only:
            raise StoreError(f"{store.path} is read-only here: a newer glmchat wrote it; update glmchat to save.")
        try:
            store._conn.execute("BEGIN IMMEDIATE")  # waits up to BUSY_TIMEOUT_S for another glmchat's write
        except sqlite3.Error as err:
            raise _store_error(err, store.path, "save to") from err
        return store._conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        conn = self._store._conn
        try:
            if exc_type is None:
                conn.execute("COMMIT")
                return False
            if conn.in_transaction:  # SQLite rolls some failures (a full disk) back itself
                conn.execute("ROLLBACK")
        except sqlite3.Error as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _store_error(err, self._store.path, "save to") from err
        if isinstance(exc, sqlite3.Error):
            raise _store_error(exc, self._store.path, "save to") from exc
        return False


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _use_wal(conn: sqlite3.Connection) -> None:
    """WAL lets readers work while another glmchat writes. Switching needs the lock for a moment: if another
    (older) glmchat holds it now, stay in the current mode rather than wait; a later start switches."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
    except sqlite3.OperationalError as err:
        if not _is_busy(err):
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")


def _connect_read_only(path: Path) -> sqlite3.Connection:
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    _user_version(conn)  # fail now, not at the first read, if it cannot be read
    return conn


# SQLite's primary result codes (the low byte of an extended code)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26


def _result_code(err: sqlite3.Error) -> Optional[int]:
    code = getattr(err, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else code & 0xFF


def _is_busy(err: sqlite3.Error) -> bool:
    """Another connection holds a lock: contention, never corruption."""
    code = _result_code(err)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _corruption(err: sqlite3.Error) -> Optional[int]:
    """SQLITE_NOTADB or SQLITE_CORRUPT when ``err`` says the file is damaged, else None."""
    code = _result_code(err)
    if code is None:  # Python 3.10: no codes on the exception
        text = str(err).lower()
        code = _SQLITE_NOTADB if "not a database" in text else _SQLITE_CORRUPT if "malformed" in text else None
    return code if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT) else None


def _is_corrupt(err: sqlite3.Error, path: Path) -> bool:
    """Only SQLite's own corruption codes count; a damaged page is confirmed with PRAGMA quick_check."""
    code = _corruption(err)
    if code != _SQLITE_CORRUPT:
        return code == _SQLITE_NOTADB
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
        try:
            return conn.execute("PRAGMA quick_check").fetchone() != ("ok",)
        finally:
            conn.close()
    except sqlite3.Error as check_err:
        return _corruption(check_err) is not None


def _store_error(err: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """One sentence for the app: a busy file names the other glmchat, never calls the file corrupt."""
    if _is_busy(err):
        return StoreError(f"Could not {doing} {path}: another glmchat kept it busy for {BUSY_TIMEOUT_S:g} s; "
                          "try again in a moment.")
    if _corruption(err) is not None:  # a damaged page found after opening: the file is in use, so not moved now
        return StoreError(f"Could not {doing} {path}: it is damaged ({err}); quit glmchat and move the file "
                          "elsewhere, and glmchat starts a new one.")
    return StoreError(f"Could not {doing} {path}: {err}.")


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
