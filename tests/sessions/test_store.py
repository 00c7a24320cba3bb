from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import pytest

from sessions.errors import InvalidRequest, SessionExists, SessionNotFound
from sessions.messages import Message
from sessions.store import KVReport, MemoryStore, SQLiteStore, open_store
from sessions.store.base import SessionRecord
from tests.paths import REPO

U1, A1, U2, A2 = Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2"), Message("assistant", "a2")


def record(session_id: str = "s1", now: float = 100.0, **fields) -> SessionRecord:
    values = {"system_prompt": "Be terse.", "metadata": {"k": [1, 2]}, "owner": "alice", "last_active_at": now}
    values["history_id"] = f"history-of-{session_id}"  # fixed, so records built twice compare equal
    return SessionRecord(session_id=session_id, created_at=now, **(values | fields))


def test_create_get_round_trip(store):
    store.create(record())
    assert store.get("s1") == record()
    assert store.get("missing") is None


def test_create_twice_raises_and_keeps_the_first(store):
    store.create(record(system_prompt="first"))
    with pytest.raises(SessionExists):
        store.create(record(system_prompt="second"))
    assert store.get("s1").system_prompt == "first"
    assert store.count() == 1


def test_returned_record_is_a_copy(store):
    store.create(record())
    got = store.get("s1")
    got.metadata["k"].append(3)
    got.system_prompt = "changed"
    assert store.get("s1") == record()


def test_append_and_messages_in_order(store):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0)
    store.append("s1", [U2], now=160.0)
    assert store.messages("s1") == [U1, A1, U2]
    assert store.get("s1").last_active_at == 160.0


def test_window_returns_the_last_messages_in_order(store):
    store.create(record())
    store.append("s1", [U1, A1, U2, A2], now=101.0)
    assert store.messages("s1", window=2) == [U2, A2]
    assert store.messages("s1", window=1) == [A2]
    assert store.messages("s1", window=99) == [U1, A1, U2, A2]
    with pytest.raises(InvalidRequest):
        store.messages("s1", window=0)


def test_system_prompt_is_not_among_messages(store):
    store.create(record(system_prompt="Be terse."))
    store.append("s1", [U1], now=101.0)
    assert store.messages("s1") == [U1]


def test_append_to_missing_session(store):
    with pytest.raises(SessionNotFound):
        store.append("nope", [U1], now=1.0)
    assert store.count() == 0


def test_reads_and_edits_of_a_missing_session_raise(store):
    with pytest.raises(SessionNotFound):
        store.messages("nope")
    with pytest.raises(SessionNotFound):
        store.clear("nope", 5.0)
    with pytest.raises(SessionNotFound):
        store.touch("nope", 5.0)


def test_append_is_all_or_nothing(store):
    store.create(record())
    store.append("s1", [U1], now=101.0)
    with pytest.raises(TypeError):
        store.append("s1", [A1, {"role": "user", "content": "not parsed"}], now=200.0)  # type: ignore[list-item]
    assert store.messages("s1") == [U1]
    assert store.get("s1").last_active_at == 101.0


def test_sqlite_append_rolls_back_a_failure_midway(tmp_path):
    """The failure happens inside the transaction (after the first row was inserted), not in pre-validation."""
    store = SQLiteStore(tmp_path / "s.db")
    store.create(record())
    with sqlite3.connect(tmp_path / "s.db") as other:
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.content = 'boom'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(sqlite3.IntegrityError):
        store.append("s1", [U1, A1, Message("user", "boom")], now=200.0, kv=KVReport("device", 3, "r1"))
    assert store.messages("s1") == []
    assert store.get("s1") == record()  # neither last_active_at nor the KV report changed
    store.append("s1", [U1], now=201.0)  # the connection is usable again
    assert store.messages("s1") == [U1]
    store.close()


def test_clear_keeps_record_and_system_prompt(store):
    store.create(record(system_prompt="Be terse."))
    store.append("s1", [U1, A1], now=101.0)
    store.clear("s1", 101.5)
    assert store.messages("s1") == []
    assert store.get("s1").system_prompt == "Be terse."
    store.append("s1", [U2], now=102.0)  # numbering restarts cleanly after clear
    assert store.messages("s1") == [U2]


def test_delete_removes_messages_too(store):
    store.create(record())
    store.append("s1", [U1, A1], now=101.0)
    before = store.get("s1")
    assert store.delete("s1") == before
    assert store.delete("s1") is None
    assert store.get("s1") is None
    store.create(record())  # the id is free again and carries no old messages
    assert store.messages("s1") == []


def test_touch_count_and_expire_idle(store):
    store.create(record("old", now=10.0))
    store.create(record("older", now=5.0))
    store.create(record("new", now=50.0))
    store.create(record("newer", now=70.0))
    assert store.count() == 4
    assert store.expire_idle(8.0) == ["older"]
    assert store.get("older") is None and store.count() == 3
    store.touch("old", 30.0)
    assert store.expire_idle(30.0) == []  # strictly before
    store.append("old", [U1], now=60.0)
    assert store.expire_idle(65.0) == ["new", "old"]  # least recently active first
    assert store.get("old") is None and store.missing(["old", "new", "newer"]) == ["old", "new"]
    assert store.count() == 1


def test_missing_lists_ids_without_a_record_in_the_given_order(store):
    store.create(record("a"))
    store.create(record("c"))
    assert store.missing(["z", "a", "b", "c"]) == ["z", "b"]
    assert store.missing([]) == []
    many = [f"x{i}" for i in range(1200)]  # more ids than one SQLite query takes
    store.create(record("x700"))
    assert store.missing(many) == [i for i in many if i != "x700"]


def test_store_is_safe_across_threads(store):
    store.create(record())

    def writer(n: int) -> None:
        for i in range(20):
            store.append("s1", [Message("user", f"{n}-{i}"), Message("assistant", f"{n}-{i}")], now=float(i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = store.messages("s1")
    assert len(history) == 160
    pairs = list(zip(history[::2], history[1::2], strict=True))
    assert all(u.role == "user" and a.role == "assistant" and u.content == a.content for u, a in pairs)


# What SQLiteStore files of earlier versions hold (PRAGMA user_version): opening one with this version upgrades it.
_V1_SESSIONS = """CREATE TABLE sessions (
    session_id     TEXT PRIMARY KEY,
    system_prompt  TEXT,
    metadata       TEXT NOT NULL,
    owner          TEXT,
    created_at     REAL NOT NULL,
    last_active_at REAL NOT NULL
)"""
_V1_REST = (
    "CREATE INDEX sessions_by_last_active ON sessions (last_active_at)",
    """CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,
        role       TEXT NOT NULL,
        content    TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID""",
)
OLD_SQLITE_SCHEMAS = {
    1: (_V1_SESSIONS, *_V1_REST),
    2: (
        _V1_SESSIONS,
        *_V1_REST,
        "ALTER TABLE sessions ADD COLUMN lease_holder TEXT",
        "ALTER TABLE sessions ADD COLUMN lease_until REAL",
        "CREATE INDEX sessions_by_owner ON sessions (owner, last_active_at, session_id)",
    ),
    3: (
        _V1_SESSIONS,
        *_V1_REST,
        "ALTER TABLE sessions ADD COLUMN lease_holder TEXT",
        "ALTER TABLE sessions ADD COLUMN lease_until REAL",
        "CREATE INDEX sessions_by_owner ON sessions (owner, last_active_at, session_id)",
        "ALTER TABLE sessions ADD COLUMN kv_tier TEXT NOT NULL DEFAULT 'none'",
        "ALTER TABLE sessions ADD COLUMN kv_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE sessions ADD COLUMN kv_replica TEXT NOT NULL DEFAULT ''",
    ),
}
OLD_INSERT = (  # how those versions wrote a record; still valid on an upgraded file
    "INSERT INTO sessions (session_id, system_prompt, metadata, created_at, last_active_at, owner)"
    " VALUES (?, 'Be terse.', '{\"k\": [1, 2]}', 100.0, 100.0, 'alice')"
)


@pytest.mark.parametrize("version", sorted(OLD_SQLITE_SCHEMAS))
def test_sqlite_upgrades_the_file_of_an_earlier_version(tmp_path, version):
    path = tmp_path / f"v{version}.db"
    with closing(sqlite3.connect(path)) as old:
        for statement in OLD_SQLITE_SCHEMAS[version]:
            old.execute(statement)
        old.execute(OLD_INSERT, ("s1",))
        old.execute("INSERT INTO messages (session_id, seq, role, content) VALUES ('s1', 0, 'user', 'u1')")
        old.execute(f"PRAGMA user_version = {version}")
        old.commit()
    store = SQLiteStore(path)
    assert store.get("s1") == record(history_id="")  # kv: nothing reported; no history id (a turn reads it all)
    assert store.messages("s1") == [U1]
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    store.append("s1", [A1], now=150.0, holder="turn-a", kv=KVReport("device", 7, "r1"))
    assert store.list("alice") == [record(last_active_at=150.0, kv=KVReport("device", 7, "r1"), history_id="")]
    store.release_lease("s1", "turn-a")
    store.close()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (5,)
        raw.execute(OLD_INSERT, ("s2",))  # a process still running the old version shares the file
        raw.execute("DELETE FROM messages WHERE session_id = 's1'")  # and clears a session as it did
        raw.commit()
    reopened = SQLiteStore(path)  # opening an upgraded file again changes nothing
    assert reopened.get("s1").kv == KVReport("device", 7, "r1")
    assert len(reopened.get("s1").history_id) == 32  # that clear started a new history all the same
    assert reopened.get("s2") == record("s2", history_id="")
    assert reopened.clear("s1", 200.0) == KVReport("device", 7, "r1")
    assert reopened.get("s1").kv == KVReport()
    reopened.close()


def test_sqlite_is_durable_across_store_objects(tmp_path):
    path = tmp_path / "durable.db"
    first = SQLiteStore(path)
    first.create(record())
    first.append("s1", [U1, A1], now=150.0)
    first.close()
    second = SQLiteStore(path)
    assert second.get("s1") == record(last_active_at=150.0)
    assert second.messages("s1") == [U1, A1]
    second.close()


def test_sqlite_is_shared_with_another_process(tmp_path):
    path = tmp_path / "shared.db"
    store = SQLiteStore(path)
    store.create(record(metadata={"lang": "fr"}))
    store.append("s1", [U1, A1], now=150.0)
    script = (
        "import sys; from sessions.messages import Message; from sessions.store.sqlite import SQLiteStore\n"
        "s = SQLiteStore(sys.argv[1])\n"
        "r = s.get('s1'); print(r.system_prompt, r.metadata['lang'], r.owner, r.last_active_at)\n"
        "print([m.content for m in s.messages('s1')])\n"
        "s.append('s1', [Message('user', 'from child')], now=170.0)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert child.stdout.splitlines() == ["Be terse. fr alice 150.0", "['u1', 'a1']"]
    # the parent's open store sees the child's write: nothing is cached in memory
    assert store.messages("s1") == [U1, A1, Message("user", "from child")]
    assert store.get("s1").last_active_at == 170.0
    store.close()


def test_sqlite_uses_wal_and_cascades(tmp_path):
    path = tmp_path / "wal.db"
    store = SQLiteStore(path)
    store.create(record())
    store.append("s1", [U1], now=101.0)
    store.delete("s1")
    store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_kv_report_defaults_and_checks():
    assert KVReport() == KVReport("none", 0, "") and record().kv == KVReport()
    assert KVReport("host", 5).replica == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        KVReport().tier = "device"  # type: ignore[misc]
    for bad in (
        {"tier": "gpu"},
        {"tier": "Device"},
        {"tokens": -1},
        {"tokens": 1.5},
        {"tokens": True},
        {"replica": None},
    ):
        with pytest.raises(ValueError, match="KV report"):
            KVReport(**bad)


def test_open_store_memory():
    assert isinstance(open_store("memory://"), MemoryStore)


@pytest.mark.parametrize("slashes", ["", "/"])  # sqlite:///abs and SQLAlchemy's sqlite:////abs
def test_open_store_sqlite_creates_parent_dirs(tmp_path, slashes):
    path = tmp_path / "deep" / "er" / "sessions.db"
    store = open_store(f"sqlite://{slashes}{path}")
    assert isinstance(store, SQLiteStore)
    store.create(record())
    store.close()
    assert path.exists()


@pytest.mark.parametrize("url", ["mysql://localhost", "sqlite://relative.db", "sqlite:///", "", "/tmp/x.db"])
def test_open_store_rejects_other_urls_naming_supported_schemes(url):
    with pytest.raises(ValueError, match=r"memory://.*sqlite:///.*postgresql://.*redis"):
        open_store(url)
