"""Group commit: writers that overlap share one COMMIT, yet each is atomic on its own and durable when it returns."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sessions.errors import StoreUnavailable
from sessions.store.group_commit import GroupCommit
from sessions.store.sqlite import SQLiteStore


def _open(path: Path, max_writes: int = 64) -> tuple[sqlite3.Connection, GroupCommit, list[str]]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # as the store runs it: durability comes from GroupCommit's fsync
    conn.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS rows (name TEXT PRIMARY KEY,"
        " parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    conn.execute("PRAGMA foreign_keys = ON")
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    unavailable = lambda error: StoreUnavailable(str(error))  # noqa: E731
    group = GroupCommit(conn, threading.Lock(), unavailable, Path(f"{path}-wal"), max_writes)
    return conn, group, statements


def _names(path: Path) -> set[str]:
    with sqlite3.connect(path) as other:  # another connection: sees committed rows only
        return {name for (name,) in other.execute("SELECT name FROM rows")}


def _overlapping(
    group: GroupCommit, bodies: list[Callable[[sqlite3.Connection], None]], durable: list[bool] | None = None
) -> list[BaseException | None]:
    """Run the bodies as writers that are all waiting for the lock while the first one's body runs."""
    outcomes: list[BaseException | None] = [None] * len(bodies)
    first_inside = threading.Event()
    release_first = threading.Event()

    def writer(index: int) -> None:
        try:
            with group.write(True if durable is None else durable[index]) as conn:
                bodies[index](conn)
                if index == 0:
                    first_inside.set()
                    release_first.wait(10)
        except BaseException as error:
            outcomes[index] = error

    threads = [threading.Thread(target=writer, args=(0,))]
    threads[0].start()
    assert first_inside.wait(10)
    for index in range(1, len(bodies)):
        threads.append(threading.Thread(target=writer, args=(index,)))
        threads[-1].start()
    deadline = time.monotonic() + 10
    while group._arriving < len(bodies) - 1:  # every other writer is queued on the lock
        assert time.monotonic() < deadline, "writers never queued"
        time.sleep(0.001)
    release_first.set()
    for thread in threads:
        thread.join(10)
    return outcomes


def _insert(name: str, parent: int | None = None) -> Callable[[sqlite3.Connection], None]:
    return lambda conn: conn.execute("INSERT INTO rows VALUES (?, ?)", (name, parent)) and None


def test_overlapping_writers_share_one_commit_and_are_durable(tmp_path):
    _conn, group, statements = _open(tmp_path / "db")
    outcomes = _overlapping(group, [_insert(f"w{i}") for i in range(4)])
    assert outcomes == [None] * 4
    assert statements.count("COMMIT") == 1
    assert _names(tmp_path / "db") == {"w0", "w1", "w2", "w3"}


def test_a_failing_writer_undoes_only_its_own_changes(tmp_path):
    _conn, group, _ = _open(tmp_path / "db")

    def fails(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO rows VALUES ('bad', NULL)")
        raise ValueError("refused after writing")

    outcomes = _overlapping(group, [_insert("a"), fails, _insert("c")])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ValueError)
    assert _names(tmp_path / "db") == {"a", "c"}


def test_a_failed_commit_fails_every_writer_of_the_batch_and_keeps_nothing(tmp_path):
    _conn, group, _ = _open(tmp_path / "db")
    # A deferred foreign key is checked at COMMIT: one writer's dangling reference fails the whole batch.
    outcomes = _overlapping(group, [_insert("a"), _insert("dangling", parent=42), _insert("c")])
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert _names(tmp_path / "db") == set()
    with group.write() as conn:  # the store goes on working afterwards
        conn.execute("INSERT INTO rows VALUES ('after', NULL)")
    assert _names(tmp_path / "db") == {"after"}


def test_a_lone_writer_commits_at_once(tmp_path):
    _conn, group, statements = _open(tmp_path / "db")
    for name in ("x", "y"):
        with group.write() as conn:
            conn.execute("INSERT INTO rows VALUES (?, NULL)", (name,))
        assert name in _names(tmp_path / "db")  # durable when write() returned, no other writer needed
    assert statements.count("COMMIT") == 2


def test_sqlite_store_writers_in_many_threads_are_all_committed(tmp_path):
    from sessions.messages import Message
    from sessions.store.base import SessionRecord

    store = SQLiteStore(tmp_path / "sessions.db")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for turn in range(10):
                session_id = f"s{worker}-{turn}"
                store.create(SessionRecord(session_id, None, {}, 0.0, 0.0))
                store.append(session_id, [Message("user", f"m{turn}")], 1.0)
                if turn % 2:
                    assert store.delete(session_id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    reopened = SQLiteStore(tmp_path / "sessions.db")  # what a new process finds on disk
    assert reopened.count() == 8 * 5
    assert reopened.messages("s3-4") == [Message("user", "m4")]


@pytest.mark.parametrize("max_writes", [1, 2])
def test_a_batch_is_committed_after_max_writes_even_with_writers_waiting(tmp_path, max_writes):
    _conn, group, statements = _open(tmp_path / "db", max_writes)
    outcomes = _overlapping(group, [_insert(f"w{i}") for i in range(4)])
    assert outcomes == [None] * 4
    assert statements.count("COMMIT") == -(-4 // max_writes)
    assert len(_names(tmp_path / "db")) == 4


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths GroupCommit fsyncs (it syncs the WAL itself; SQLite runs with synchronous=NORMAL and never does)."""
    import sessions.store.group_commit as group_commit

    synced: list[int] = []
    real = os.fsync

    def counting(descriptor: int) -> None:
        synced.append(descriptor)
        real(descriptor)

    monkeypatch.setattr(group_commit.os, "fsync", counting)
    return synced


def test_a_batch_fsyncs_once_if_any_write_is_durable_and_never_otherwise(tmp_path, fsyncs):
    _conn, group, _ = _open(tmp_path / "db")
    assert _overlapping(group, [_insert("a"), _insert("b")], durable=[False, False]) == [None, None]
    assert fsyncs == []
    assert _overlapping(group, [_insert("c"), _insert("d"), _insert("e")], durable=[False, True, False]) == [None] * 3
    assert len(fsyncs) == 1
    assert _names(tmp_path / "db") == {"a", "b", "c", "d", "e"}


def test_sqlite_store_fsyncs_turn_commits_but_not_leases(tmp_path, fsyncs):
    from sessions.messages import Message
    from sessions.store.base import SessionRecord

    store = SQLiteStore(tmp_path / "s.db")
    store.create(SessionRecord("s1", None, {}, 0.0, 0.0))
    fsyncs.clear()
    store.acquire_lease("s1", "turn-a", 30.0)
    assert fsyncs == []  # a lease lost in a power cut lapses by itself
    store.append("s1", [Message("user", "hi"), Message("assistant", "hello")], 2.0, holder="turn-a")
    assert len(fsyncs) == 1  # the turn's commit is on disk when append returns
    store.release_lease("s1", "turn-a")
    assert len(fsyncs) == 1
    store.close()
    reopened = SQLiteStore(tmp_path / "s.db")
    assert [m.content for m in reopened.messages("s1")] == ["hi", "hello"]
    reopened.acquire_lease("s1", "turn-b", 30.0)  # turn-a gave the lease back
