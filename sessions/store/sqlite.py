"""SQLite history store, the default: durable across restarts and shareable by several processes (Ray replicas).

Nothing is cached in memory: every call is a transaction on the file, so two processes on one file always agree.
Writes take the write lock up front (BEGIN IMMEDIATE) because a deferred transaction that upgrades from read to
write can fail with SQLITE_BUSY without waiting on busy_timeout.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sessions.errors import SessionExists
from sessions.messages import Message
from sessions.store.base import SessionRecord, check_messages, check_window, not_found

_SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id     TEXT PRIMARY KEY,
        system_prompt  TEXT,
        metadata       TEXT NOT NULL,      -- JSON object
        owner          TEXT,
        created_at     REAL NOT NULL,
        last_active_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_by_last_active ON sessions (last_active_at)",
    """CREATE TABLE IF NOT EXISTS messages (
        session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,       -- 0, 1, 2, ... per session, restarting at 0 after clear
        role       TEXT NOT NULL,
        content    TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID""",
)
_IDS_PER_QUERY = 500  # bound parameters per IN (...) query, far below SQLite's limit
_RECORD_COLUMNS = "session_id, system_prompt, metadata, created_at, last_active_at, owner"


def _record(row: tuple) -> SessionRecord:
    session_id, system_prompt, metadata, created_at, last_active_at, owner = row
    return SessionRecord(session_id, system_prompt, json.loads(metadata), created_at, last_active_at, owner)


class SQLiteStore:
    """One connection shared by this process's threads behind a lock; WAL so readers in other processes never block."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )  # isolation_level=None: we issue BEGIN/COMMIT ourselves
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")  # a committed turn survives power loss, not just a crash
        self._conn.execute("PRAGMA foreign_keys = ON")  # per connection; needed for ON DELETE CASCADE
        with self._write() as conn:  # not executescript(): it would COMMIT first and race another process's init
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute(begin)
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:  # some errors (e.g. disk full) already rolled back
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _write(self) -> Iterator[sqlite3.Connection]:
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> Iterator[sqlite3.Connection]:
        return self._transaction("BEGIN")  # one snapshot for multi-statement reads

    @staticmethod
    def _require(conn: sqlite3.Connection, session_id: str) -> None:
        if conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
            raise not_found(session_id)

    def create(self, record: SessionRecord) -> None:
        metadata = json.dumps(record.metadata)
        try:
            with self._write() as conn:
                conn.execute(
                    f"INSERT INTO sessions ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.session_id,
                        record.system_prompt,
                        metadata,
                        record.created_at,
                        record.last_active_at,
                        record.owner,
                    ),
                )
        except sqlite3.IntegrityError:
            raise SessionExists(f"session {record.session_id!r} already exists: pick another id or omit it") from None

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def delete(self, session_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def append(self, session_id: str, messages: Sequence[Message], now: float) -> None:
        batch = check_messages(messages)
        with self._write() as conn:
            self._require(conn, session_id)
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
            conn.executemany(
                "INSERT INTO messages (session_id, seq, role, content) VALUES (?, ?, ?, ?)",
                [(session_id, last + 1 + i, m.role, m.content) for i, m in enumerate(batch)],
            )
            conn.execute("UPDATE sessions SET last_active_at = ? WHERE session_id = ?", (now, session_id))

    def messages(self, session_id: str, window: int | None = None) -> list[Message]:
        check_window(window)
        with self._read() as conn:
            self._require(conn, session_id)
            rows = conn.execute(
                "SELECT role, content FROM (SELECT seq, role, content FROM messages WHERE session_id = ?"
                " ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (session_id, -1 if window is None else min(window, 2**63 - 1)),
            ).fetchall()
        return [Message(role, content) for role, content in rows]

    def message_count(self, session_id: str) -> int:
        with self._read() as conn:
            self._require(conn, session_id)
            (count,) = conn.execute("SELECT COUNT(*) FROM messages WHERE session_id = ?", (session_id,)).fetchone()
        return count

    def clear(self, session_id: str) -> None:
        with self._write() as conn:
            self._require(conn, session_id)
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))

    def touch(self, session_id: str, now: float) -> None:
        with self._write() as conn:
            cursor = conn.execute("UPDATE sessions SET last_active_at = ? WHERE session_id = ?", (now, session_id))
            if cursor.rowcount == 0:
                raise not_found(session_id)

    def count(self) -> int:
        with self._lock:
            (count,) = self._conn.execute("SELECT COUNT(*) FROM sessions").fetchone()
        return count

    def idle_since(self, before: float) -> list[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT session_id FROM sessions WHERE last_active_at < ? ORDER BY last_active_at", (before,)
            ).fetchall()
        return [session_id for (session_id,) in rows]

    def missing(self, session_ids: Sequence[str]) -> list[str]:
        present: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(session_ids), _IDS_PER_QUERY):
                chunk = session_ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT session_id FROM sessions WHERE session_id IN ({marks})", chunk)
                present.update(session_id for (session_id,) in rows)
        return [session_id for session_id in session_ids if session_id not in present]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
