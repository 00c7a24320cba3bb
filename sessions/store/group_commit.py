"""Group commit for the SQLite store: concurrent writers of one process share a transaction and its fsync.

With `synchronous=FULL` every COMMIT waits for an fsync (about 1-5 ms on a virtual disk), and the store's single
connection serialises writers, so one process could commit at most a few hundred writes a second however many
threads ask. Here a writer that finds a batch open joins it (its statements run inside a SAVEPOINT, so its own
failure undoes only its changes); the last writer to arrive commits the whole batch once and wakes the others. No
writer returns before the COMMIT that made its change durable, and a failed COMMIT fails every writer of the batch,
so the durability each caller sees is exactly that of its own transaction (what PostgreSQL does with its WAL
flushes). A batch is committed after at most `max_writes` writers so that a steady stream cannot postpone it.

The connection runs with `synchronous=NORMAL` (SQLite then never syncs the WAL at a commit) and this class fsyncs the
WAL file after COMMIT whenever the batch holds a durable write: the same guarantee as `synchronous=FULL` for those,
while a batch of only non-durable writes (turn leases, which lapse by themselves) skips the fsync.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sessions.errors import StoreUnavailable


@dataclass(slots=True)
class _Batch:
    """One open write transaction and the writers waiting for its COMMIT."""

    writes: int = 0
    durable: bool = False  # a kept write asked to survive power loss: fsync the WAL after COMMIT
    done: threading.Event = field(default_factory=threading.Event)
    error: StoreUnavailable | None = None


class GroupCommit:
    """Write transactions on a shared connection, batched; `lock` is the connection's lock (readers take it too)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        lock: threading.Lock,
        unavailable: Callable[[sqlite3.Error], StoreUnavailable],
        wal: Path,
        max_writes: int = 64,
    ) -> None:
        self._conn = conn
        self._wal = wal
        self._lock = lock
        self._unavailable = unavailable
        self._max_writes = max_writes
        self._arriving = 0  # writers between wanting the lock and holding it: the batch waits for them
        self._arriving_lock = threading.Lock()
        self._batch: _Batch | None = None

    @property
    def open(self) -> bool:
        """A batch is open: statements on the connection run inside its transaction (call with `lock` held)."""
        return self._batch is not None

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One writer's changes, atomic on their own and committed when this returns (on disk too, if `durable`);
        errors leave them undone."""
        with self._arriving_lock:
            self._arriving += 1
        self._lock.acquire()
        with self._arriving_lock:
            self._arriving -= 1
        try:
            batch = self._join()
        except BaseException:
            self._lock.release()
            raise
        failure: BaseException | None = None
        try:
            yield self._conn
        except BaseException as error:
            failure = error
        if self._finish_write(batch, failure, durable):  # releases the lock
            batch.done.wait()
        if failure is not None:
            if isinstance(failure, sqlite3.OperationalError):
                raise self._unavailable(failure) from None
            raise failure
        if batch.error is not None:
            raise batch.error

    def _join(self) -> _Batch:
        if self._batch is None:
            try:
                self._conn.execute("BEGIN IMMEDIATE")  # the file's write lock, held until the batch commits
            except sqlite3.OperationalError as error:  # locked past busy_timeout, unreadable file, ...
                raise self._unavailable(error) from None
            self._batch = _Batch()
        self._conn.execute("SAVEPOINT writer")
        return self._batch

    def _finish_write(self, batch: _Batch, failure: BaseException | None, durable: bool) -> bool:
        """Keep or undo this writer's changes, commit the batch if nobody else is coming; releases the lock.

        True: another writer will commit the batch (wait for it); False: this one ended it, committed or lost.
        """
        try:
            if not self._conn.in_transaction:  # some errors (e.g. disk full) roll the whole transaction back
                lost = failure if isinstance(failure, sqlite3.Error) else sqlite3.OperationalError("rolled back")
                self._end(batch, self._unavailable(lost))
                return False
            if failure is None:
                self._conn.execute("RELEASE writer")
                batch.writes += 1
                batch.durable |= durable
            else:
                self._conn.execute("ROLLBACK TO writer")
                self._conn.execute("RELEASE writer")
            with self._arriving_lock:
                others_coming = self._arriving > 0
            if others_coming and batch.writes < self._max_writes:
                return True  # the last writer to arrive commits for everyone
            self._end(batch, self._commit(batch.durable))
            return False
        finally:
            self._lock.release()

    def _commit(self, durable: bool) -> StoreUnavailable | None:
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as error:  # I/O errors, disk full, a deferred constraint
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            return self._unavailable(error)
        if durable:
            try:
                descriptor = os.open(self._wal, os.O_RDONLY)  # fsync reaches the file's data through any descriptor
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            except OSError as error:
                return self._unavailable(sqlite3.OperationalError(f"fsync of {self._wal}: {error}"))
        return None

    def _end(self, batch: _Batch, error: StoreUnavailable | None) -> None:
        batch.error = error
        self._batch = None
        batch.done.set()
