"""SQLite history store, the default: durable across restarts and shareable by several processes (Ray replicas).

Nothing is cached in memory: every call is a transaction on the file, so two processes on one file always agree.
Writes take the write lock up front (BEGIN IMMEDIATE) because a deferred transaction that upgrades from read to
write can fail with SQLITE_BUSY without waiting on busy_timeout; the same lock makes lease checks atomic. Concurrent
writers of one process share a transaction and its fsync (group_commit.py), each still durable before it returns.
"""

from __future__ import annotations

import builtins  # the stores have a `list` method, so their annotations say builtins.list
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sessions.errors import StoreUnavailable
from sessions.messages import Message
from sessions.store import base
from sessions.store.base import MAX_OFFSET, Lease, SessionRecord
from sessions.store.group_commit import GroupCommit
from sessions.store.values import (
    UNCHANGED,
    HistoryPrefix,
    Holder,
    KVReport,
    KVUpdate,
    Metadata,
    Owner,
    Prompt,
    TokenUsage,
    Unchanged,
)

_SCHEMA_VERSION = 5
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
# Columns added to `sessions` after version 1, by ALTER TABLE at open when a file lacks them. 1 -> 2: the turn lease
# (holder, expiry as caller wall time); 2 -> 3: the KV report of the last turn committed with one; 3 -> 4: the KV
# report's token usage (JSON) and the session's KV policy; 4 -> 5: the history id ('' in rows from before it).
_ADDED_COLUMNS = {
    "lease_holder": "TEXT",
    "lease_until": "REAL",
    "kv_tier": "TEXT NOT NULL DEFAULT 'none'",
    "kv_tokens": "INTEGER NOT NULL DEFAULT 0",
    "kv_replica": "TEXT NOT NULL DEFAULT ''",
    "kv_usage": "TEXT NOT NULL DEFAULT '{}'",
    "kv_policy": "TEXT NOT NULL DEFAULT 'pinned'",
    "history_id": "TEXT NOT NULL DEFAULT ''",
}
_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, last_active_at, session_id)"  # v2
# v5: deleting a history's first message (a clear, by whichever version of sessionserve shares the file) gives the
# session a new history id, so a turn holding a prefix of the old history reads the new one whole.
_NEW_HISTORY_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS messages_new_history AFTER DELETE ON messages WHEN OLD.seq = 0"
    " BEGIN UPDATE sessions SET history_id = lower(hex(randomblob(16))) WHERE session_id = OLD.session_id; END"
)
_IDS_PER_QUERY = 500  # bound parameters per IN (...) query, far below SQLite's limit
_RECORD_COLUMNS = (
    "session_id, system_prompt, metadata, created_at, last_active_at, owner, kv_tier, kv_tokens, kv_replica,"
    " kv_usage, kv_policy, history_id"
)
_NO_KV = "kv_tier = 'none', kv_tokens = 0, kv_replica = '', kv_usage = '{}'"  # SET clause: KVReport()
_Row = tuple[Any, ...]


def _record(row: _Row) -> SessionRecord:
    session_id, prompt, metadata, created_at, last_active_at, owner, tier, tokens, replica, usage, policy, history = row
    kv = KVReport(tier, tokens, replica, TokenUsage.from_json(usage))
    return SessionRecord(
        session_id, prompt, json.loads(metadata), created_at, last_active_at, owner, kv, policy, history
    )


class SQLiteStore:
    """One connection shared by this process's threads behind a lock; WAL so readers in other processes never block.

    `idle_ttl_s` is accepted for a uniform constructor (the manager drives expiry); `clock` is the lease clock.
    """

    runs_on_loop = False  # no asyncio driver; its commits wait for fsync in a worker thread

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 10.0,
        idle_ttl_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )  # isolation_level=None: we issue BEGIN/COMMIT ourselves
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # A committed turn survives power loss, not just a crash: group_commit fsyncs the WAL after every durable
        # commit itself, so that writes which may be lost (turn leases) can skip the fsync (NORMAL never syncs it).
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")  # per connection; needed for ON DELETE CASCADE
        self._writes = GroupCommit(self._conn, self._lock, self._unavailable, Path(f"{self.path}-wal"))
        with self._write() as conn:  # not executescript(): it would COMMIT first and race another process's init
            for statement in _SCHEMA:
                conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in columns:
                    conn.execute(f"ALTER TABLE sessions ADD COLUMN {name} {kind}")
            conn.execute(_OWNER_INDEX)
            conn.execute(_NEW_HISTORY_TRIGGER)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One snapshot for multi-statement reads.

        While a write batch is open the read runs inside it and sees its changes a moment before they are durable;
        only a failed COMMIT (disk full, I/O error) can take back a change a read has shown.
        """
        with self._lock:
            if self._writes.open:
                try:
                    yield self._conn
                except sqlite3.OperationalError as error:
                    raise self._unavailable(error) from None
                return
            try:
                self._conn.execute("BEGIN")
            except sqlite3.OperationalError as error:  # locked past busy_timeout, unreadable file, ...
                raise self._unavailable(error) from None
            try:
                yield self._conn
            except BaseException as error:
                if self._conn.in_transaction:  # some errors (e.g. disk full) already rolled back
                    self._conn.execute("ROLLBACK")
                if isinstance(error, sqlite3.OperationalError):
                    raise self._unavailable(error) from None
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as error:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise self._unavailable(error) from None

    def _unavailable(self, error: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"the SQLite history store at {self.path} failed: {error}; retry later")

    def _one(self, sql: str, parameters: Sequence[Any] = ()) -> _Row | None:
        """One autocommit statement (no BEGIN/COMMIT round): the fast path for single reads."""
        with self._lock:
            try:
                row: _Row | None = self._conn.execute(sql, parameters).fetchone()
            except sqlite3.OperationalError as error:
                raise self._unavailable(error) from None
        return row

    def _write(self, durable: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        """`durable=False`: no fsync for this write, for what a power cut may lose harmlessly (a turn lease lapses
        by itself); it becomes durable with the next durable commit."""
        return self._writes.write(durable)

    @staticmethod
    def _require(conn: sqlite3.Connection, session_id: str) -> None:
        if conn.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,)).fetchone() is None:
            raise base.not_found(session_id)

    def _require_writable(
        self, conn: sqlite3.Connection, session_id: str, holder: str | None, owner: Owner = None
    ) -> None:
        """Not found (also another owner's, checked before the lease: others cannot probe it), busy, or writable."""
        row = conn.execute(
            "SELECT owner, lease_holder, lease_until FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None or (owner is not None and row[0] != owner):
            raise base.not_found(session_id)
        if base.lease_is_foreign(row[1], row[2], holder, self._clock()):
            raise base.busy(session_id)

    def _writable_record(
        self, conn: sqlite3.Connection, session_id: str, holder: str | None, owner: Owner
    ) -> SessionRecord:
        """The record, for a caller who may see it (else not found, before any lease check) and change it."""
        row = conn.execute(
            f"SELECT {_RECORD_COLUMNS}, lease_holder, lease_until FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        if row is None:
            raise base.not_found(session_id)
        record = base.visible(_record(row[:-2]), session_id, owner)
        if base.lease_is_foreign(row[-2], row[-1], holder, self._clock()):
            raise base.busy(session_id)
        return record

    def create(self, record: SessionRecord, *, limit: int | None = None) -> None:
        metadata = json.dumps(record.metadata)
        values = base.record_row(record, metadata)
        try:
            with self._write() as conn:  # holds the file's write lock: no other process inserts before the count
                places = ", ".join("?" * len(values))
                conn.execute(f"INSERT INTO sessions ({_RECORD_COLUMNS}) VALUES ({places})", values)
                if limit is not None and conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] > limit:
                    raise base.full(limit)  # undoes this writer's insert
        except sqlite3.IntegrityError:
            raise base.exists(record.session_id) from None

    def get(self, session_id: str) -> SessionRecord | None:
        row = self._one(f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,))
        return None if row is None else _record(row)

    def delete(self, session_id: str, *, holder: Holder = None, owner: Owner = None) -> SessionRecord | None:
        with self._write() as conn:
            row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            if row is None or not base.owned_by(record := _record(row), owner):
                return None
            self._require_writable(conn, session_id, holder)
            conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return record

    def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        now: float,
        *,
        holder: Holder = None,
        kv: KVUpdate = None,
        owner: Owner = None,
        release: bool = False,
    ) -> None:
        batch = base.check_messages(messages)
        base.check_release(holder, release)
        with self._write() as conn:
            self._require_writable(conn, session_id, holder, owner)
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
            conn.executemany(
                "INSERT INTO messages (session_id, seq, role, content) VALUES (?, ?, ?, ?)",
                [(session_id, last + 1 + i, m.role, m.content) for i, m in enumerate(batch)],
            )
            conn.execute("UPDATE sessions SET last_active_at = ? WHERE session_id = ?", (now, session_id))
            if kv is not None:
                conn.execute(
                    "UPDATE sessions SET kv_tier = ?, kv_tokens = ?, kv_replica = ?, kv_usage = ? WHERE session_id = ?",
                    (kv.tier, kv.tokens, kv.replica, kv.usage.to_json(), session_id),
                )
            if release:
                self._release(conn, session_id, holder)

    def load(
        self,
        session_id: str,
        window: int | None = None,
        *,
        owner: Owner = None,
        lease: Lease | None = None,
        after: HistoryPrefix | None = None,
    ) -> tuple[SessionRecord, builtins.list[Message]]:
        base.check_window(window)
        base.check_after(after, window, lease)
        if lease is None:
            record = base.visible(self.get(session_id), session_id, owner)
            return record, self.messages(session_id, window)
        base.check_lease(*lease)
        with self._write(durable=False) as conn:  # the lease, as acquire_lease writes it, and the read after it
            record = self._writable_record(conn, session_id, lease.holder, owner)
            self._take(conn, session_id, lease)
            return record, self._last(conn, session_id, window, base.start_after(record.history_id, after))

    def messages(self, session_id: str, window: int | None = None) -> builtins.list[Message]:
        base.check_window(window)
        with self._read() as conn:
            self._require(conn, session_id)
            return self._last(conn, session_id, window)

    @staticmethod
    def _last(conn: sqlite3.Connection, session_id: str, window: int | None, start: int = 0) -> builtins.list[Message]:
        """The last `window` messages (all if None) from position `start` (seq is the position: see _SCHEMA)."""
        rows = conn.execute(
            "SELECT role, content FROM (SELECT seq, role, content FROM messages WHERE session_id = ? AND seq >= ?"
            " ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (session_id, start, -1 if window is None else min(window, 2**63 - 1)),
        ).fetchall()
        return [Message(role, content) for role, content in rows]

    def clear(self, session_id: str, now: float, *, holder: Holder = None, owner: Owner = None) -> KVReport:
        with self._write() as conn:
            freed = self._writable_record(conn, session_id, holder, owner).kv
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            conn.execute(f"UPDATE sessions SET {_NO_KV}, last_active_at = ? WHERE session_id = ?", (now, session_id))
        return freed

    def update(
        self,
        session_id: str,
        now: float,
        *,
        system_prompt: Prompt = UNCHANGED,
        metadata: Metadata = None,
        holder: Holder = None,
        owner: Owner = None,
    ) -> tuple[SessionRecord, KVReport | None]:
        with self._write() as conn:
            before = self._writable_record(conn, session_id, holder, owner)
            new_prompt = not isinstance(system_prompt, Unchanged) and system_prompt != before.system_prompt
            if new_prompt:  # the KV no longer matches
                conn.execute(
                    f"UPDATE sessions SET system_prompt = ?, {_NO_KV} WHERE session_id = ?", (system_prompt, session_id)
                )
            conn.execute(
                "UPDATE sessions SET metadata = COALESCE(?, metadata), last_active_at = ? WHERE session_id = ?",
                (None if metadata is None else json.dumps(metadata), now, session_id),
            )
            row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return _record(row), before.kv if new_prompt else None

    def touch(self, session_id: str, now: float) -> None:
        with self._write() as conn:
            cursor = conn.execute("UPDATE sessions SET last_active_at = ? WHERE session_id = ?", (now, session_id))
            if cursor.rowcount == 0:
                raise base.not_found(session_id)

    def count(self) -> int:
        row = self._one("SELECT COUNT(*) FROM sessions")
        return 0 if row is None else int(row[0])

    def list(self, owner: str | None, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        if owner is None:
            return self._page("owner IS NULL", (), limit, offset)
        return self._page("owner = ?", (owner,), limit, offset)

    def recent(self, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page("1 = 1", (), limit, offset)

    def _page(self, where: str, params: tuple[str, ...], limit: int, offset: int) -> builtins.list[SessionRecord]:
        base.check_page(limit, offset)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE {where}"
                " ORDER BY last_active_at DESC, session_id DESC LIMIT ? OFFSET ?",
                (*params, limit, min(offset, MAX_OFFSET)),
            ).fetchall()
        return [_record(row) for row in rows]

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> None:
        base.check_lease(holder, ttl_s)
        with self._write(durable=False) as conn:  # a lease lost in a power cut is no harm: it lapses anyway
            self._require_writable(conn, session_id, holder)
            self._take(conn, session_id, Lease(holder, ttl_s))

    def _take(self, conn: sqlite3.Connection, session_id: str, lease: Lease) -> None:
        """Set the lease of a session checked writable by its holder in this write."""
        conn.execute(
            "UPDATE sessions SET lease_holder = ?, lease_until = ? WHERE session_id = ?",
            (lease.holder, self._clock() + lease.ttl_s, session_id),
        )

    def release_lease(self, session_id: str, holder: str) -> None:
        with self._write(durable=False) as conn:
            self._release(conn, session_id, holder)

    @staticmethod
    def _release(conn: sqlite3.Connection, session_id: str, holder: Holder) -> None:
        conn.execute(
            "UPDATE sessions SET lease_holder = NULL, lease_until = NULL WHERE session_id = ? AND lease_holder = ?",
            (session_id, holder),
        )

    def expire_idle(self, before: float) -> builtins.list[str]:
        with self._write() as conn:
            rows = conn.execute(
                "SELECT session_id FROM sessions WHERE last_active_at < ?"
                " AND (lease_holder IS NULL OR lease_until <= ?) ORDER BY last_active_at",
                (before, self._clock()),
            ).fetchall()
            expired = [session_id for (session_id,) in rows]
            for start in range(0, len(expired), _IDS_PER_QUERY):
                chunk = expired[start : start + _IDS_PER_QUERY]
                conn.execute(f"DELETE FROM sessions WHERE session_id IN ({','.join('?' * len(chunk))})", chunk)
        return expired

    def missing(self, session_ids: Sequence[str]) -> builtins.list[str]:
        present: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(session_ids), _IDS_PER_QUERY):
                chunk = session_ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT session_id FROM sessions WHERE session_id IN ({marks})", chunk)
                present.update(session_id for (session_id,) in rows)
        return [session_id for session_id in session_ids if session_id not in present]

    def ping(self) -> None:
        self._one("SELECT 1 FROM sessions LIMIT 1")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
