"""What only the network stores have: outages and recovery, PostgreSQL's schema, Redis's key layout and TTLs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

import psycopg
import pytest
import redis

from sessions.errors import InvalidRequest, SessionBusy, StoreUnavailable
from sessions.messages import Message
from sessions.store import KVReport, open_store, postgresql_schema
from sessions.store.base import HistoryPrefix, Lease
from sessions.store.postgresql import PostgreSQLStore
from sessions.store.postgresql_schema import SCHEMA_VERSION
from sessions.store.redis import RedisStore
from sessions.store.sqlite import SQLiteStore
from tests.paths import REPO
from tests.sessions.conftest import reset_postgres
from tests.sessions.test_store_contract import record

U1, A1 = Message("user", "u1"), Message("assistant", "a1")
LEASE_A = Lease("turn-a", 60)


# ---- outages ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # stops and restarts the server: ~8 s for PostgreSQL
@pytest.mark.parametrize("backend", ["postgresql", "redis"])
def test_unreachable_server_raises_quickly_and_the_same_store_recovers(backend, store_url, open_backend, request):
    server = request.getfixturevalue("postgres_server" if backend == "postgresql" else "redis_server")
    store = open_backend(timeout_s=0.5)  # each call below waits this long for a connection
    store.create(record())
    store.append("s1", [U1], now=150.0)
    server.stop()
    try:
        for name, call in [
            ("ping", store.ping),
            ("get", lambda: store.get("s1")),
            ("append", lambda: store.append("s1", [A1], now=160.0)),
            ("acquire_lease", lambda: store.acquire_lease("s1", "turn-a", 60)),
            ("load", lambda: store.load("s1", owner="alice")),
            ("append for its owner", lambda: store.append("s1", [A1], now=160.0, owner="alice")),
            ("clear", lambda: store.clear("s1", 160.0, owner="alice")),
            ("update", lambda: store.update("s1", 160.0, metadata={"x": 1}, owner="alice")),
            ("delete", lambda: store.delete("s1", owner="alice")),
        ]:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert time.monotonic() - started < 4, name
            message = str(caught.value)
            assert server.password not in message and f":{server.port}" in message and "retry later" in message
            assert caught.value.code == "store_unavailable"
    finally:
        server.start()
    deadline = time.monotonic() + 20
    while True:  # the same store object, not a new one
        try:
            store.ping()
            break
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if backend == "postgresql":  # durable data survives; Redis runs without persistence here
        assert store.messages("s1") == [U1]
        store.append("s1", [A1], now=170.0)
        store.append("s1", [U1], now=180.0, owner="alice")
        assert store.messages("s1") == [U1, A1, U1]
    else:
        store.create(record("s2"))
        assert store.get("s2") == record("s2")


def test_opening_a_store_on_a_stopped_port_fails_fast(postgres_server, redis_server):
    from tests.servers import free_port

    port = free_port()
    for url in (f"postgresql://u:secret-pw@127.0.0.1:{port}/db?timeout=1", f"redis://:secret-pw@127.0.0.1:{port}/0"):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            open_store(url).ping()
        assert time.monotonic() - started < 6
        assert "secret-pw" not in str(caught.value) and f"127.0.0.1:{port}" in str(caught.value)


def test_sqlite_locked_past_busy_timeout_is_unavailable(tmp_path):
    store = SQLiteStore(tmp_path / "s.db", busy_timeout_s=0.2)
    store.create(record())
    with sqlite3.connect(tmp_path / "s.db", isolation_level=None) as other:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable, match="locked"):
            store.append("s1", [U1], now=200.0)
        other.execute("ROLLBACK")
    store.append("s1", [U1], now=200.0)
    assert store.messages("s1") == [U1]
    store.close()


# ---- PostgreSQL ------------------------------------------------------------------------------------------
def test_postgresql_records_its_schema_version_once(postgres_url):
    reset_postgres(postgres_url)
    stores = []
    errors = []

    def open_one() -> None:
        try:
            stores.append(PostgreSQLStore(postgres_url))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(4)]  # replicas starting together
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(stores) == 4
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM sessionserve_schema").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {
            name for (name,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'sessionserve%'")
        }
        assert {"sessionserve_sessions_idle", "sessionserve_sessions_owner"} <= indexes
    for store in stores:
        store.close()


def test_postgresql_refuses_a_newer_schema(postgres_url):
    reset_postgres(postgres_url)
    PostgreSQLStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE sessionserve_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="newer"):
        PostgreSQLStore(postgres_url)


def _columns(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'sessionserve_sessions'")
    return {name for (name,) in rows}


def test_postgresql_migrates_a_v1_database_to_the_current_version(postgres_url, monkeypatch):
    reset_postgres(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        with monkeypatch.context() as patch:  # what a v1 sessionserve created: the v1 DDL, version row 1
            patch.setattr(postgresql_schema, "SCHEMA_VERSION", 1)
            postgresql_schema.migrate(conn, "test")
        assert conn.execute("SELECT version FROM sessionserve_schema").fetchall() == [(1,)]
        assert "kv_tier" not in _columns(conn)
        v1_insert = (  # a v1 record and message, written as v1 wrote them
            "INSERT INTO sessionserve_sessions"
            " (session_id, system_prompt, metadata, created_at, last_active_at, owner, next_seq)"
            " VALUES (%s, 'Be terse.', '{\"k\": [1, 2]}', 100.0, 100.0, 'alice', %s)"
        )
        conn.execute(v1_insert, ("s1", 1))
        conn.execute("INSERT INTO sessionserve_messages VALUES ('s1', 0, 'user', 'u1')")
    assert SCHEMA_VERSION == 5
    store = PostgreSQLStore(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM sessionserve_schema").fetchall() == [(5,)]
        assert {"kv_tier", "kv_tokens", "kv_replica", "kv_usage", "kv_policy", "history_id"} <= _columns(conn)
        conn.execute(v1_insert, ("s2", 0))  # a v1 replica still running keeps working on the v5 schema
        conn.execute(  # so does a v4 replica's create (its procedure, without the history id)
            "CALL sessionserve_create('s3'::text, NULL::text, '{}'::jsonb, 1.0::float8, 1.0::float8, 'bob'::text,"
            " 'none'::text, 0::int8, ''::text, '{}'::text, 'pinned'::text, NULL::int8, NULL)"
        )
    s2_history = store.get("s2").history_id
    assert len(s2_history) == 32 and len(store.get("s3").history_id) == 32  # the column's default: one each
    assert store.get("s1") == record(history_id="")  # from before the id: none (a turn reads all of it)
    assert store.get("s2") == record("s2", history_id=s2_history)  # nothing reported yet
    assert store.count() == 3  # v4's count: the session there before (backfilled) and those written since
    store.append("s1", [A1], now=150.0, kv=KVReport("device", 5, "r1"))
    assert store.messages("s1") == [U1, A1]
    s1 = record(last_active_at=150.0, kv=KVReport("device", 5, "r1"), history_id="")
    assert store.list("alice") == [s1, record("s2", history_id=s2_history)]
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # an older replica's clear deletes the messages
        conn.execute("DELETE FROM sessionserve_messages WHERE session_id = 's1'")
    assert store.get("s1").history_id not in ("", s2_history)  # and the session's history gets a new id all the same
    store.close()
    PostgreSQLStore(postgres_url).close()  # already at v5: opening again migrates nothing
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM sessionserve_schema").fetchall() == [(5,)]


def test_postgresql_counts_sessions_through_an_operators_truncate(postgres_url):
    reset_postgres(postgres_url)
    store = PostgreSQLStore(postgres_url)
    for session_id in ("s1", "s2", "s3"):
        store.create(record(session_id))
    store.delete("s2")
    assert store.count() == 2
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("TRUNCATE sessionserve_sessions CASCADE")
    assert store.count() == 0
    store.create(record("s4"), limit=1)
    assert store.count() == 1
    store.close()


def _behind_an_uncommitted_append(postgres_url: str, call: Callable[[], object]) -> dict[str, object]:
    """Run `call` in a thread while an append, as _APPEND writes it, holds session s1's row lock uncommitted; commit
    the append once `call`'s statement waits for that lock. What `call` answered, under "answer"."""
    answered: dict[str, object] = {}
    with psycopg.connect(postgres_url) as writer, psycopg.connect(postgres_url, autocommit=True) as watcher:
        (seq,) = writer.execute(
            "UPDATE sessionserve_sessions SET next_seq = next_seq + 1, last_active_at = 160, kv_tokens = 2"
            " WHERE session_id = 's1' RETURNING next_seq - 1"
        ).fetchone()
        writer.execute(
            "INSERT INTO sessionserve_messages (session_id, seq, role, content) VALUES ('s1', %s, 'assistant', 'a1')",
            (seq,),
        )
        calling = threading.Thread(target=lambda: answered.update(answer=call()))
        calling.start()
        deadline = time.monotonic() + 10
        while not watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()[0]:  # the call's snapshot is taken: it waits for the row
            assert time.monotonic() < deadline, "the call never waited for the append's row lock"
            time.sleep(0.02)
        writer.commit()
    calling.join(10)
    return answered


def test_postgresql_clear_also_clears_an_append_that_committed_while_it_waited(postgres_url):
    """clear's one statement deletes the messages its snapshot saw. An append committed after that snapshot, while
    the clear waited for the row lock, changed the row version, so the clear takes its transaction path and
    clears that append too, answering the KV report the append left (the one a replica must free)."""
    reset_postgres(postgres_url)
    store = PostgreSQLStore(postgres_url)
    store.create(record())
    store.append("s1", [U1], now=150.0, kv=KVReport("device", 1, "r1"))
    cleared = _behind_an_uncommitted_append(postgres_url, lambda: store.clear("s1", 170.0))
    assert store.messages("s1") == []
    assert cleared["answer"] == KVReport("device", 2, "r1")
    assert store.get("s1").kv == KVReport() and store.get("s1").last_active_at == 170.0


@pytest.mark.parametrize("held", [None, 1])
def test_postgresql_a_load_with_a_lease_sees_an_append_that_committed_while_it_waited(postgres_url, held):
    """The leased load's statement reads the messages of its snapshot. An append committed after that snapshot,
    while the load waited for the row lock, changed the row version, so the load takes the lease and then reads
    again: the turn's history has that append (past the prefix it holds, if it holds one), and the lease is held."""
    reset_postgres(postgres_url)
    store = PostgreSQLStore(postgres_url)
    store.create(record())
    store.append("s1", [U1], now=150.0)
    after = None if held is None else HistoryPrefix(record().history_id, held)
    loaded = _behind_an_uncommitted_append(postgres_url, lambda: store.load("s1", lease=LEASE_A, after=after))
    assert loaded["answer"] == (record(last_active_at=160.0, kv=KVReport(tokens=2)), [U1, A1][held or 0 :])
    with pytest.raises(SessionBusy):
        store.append("s1", [U1], now=170.0, holder="turn-b")
    store.close()


def test_postgresql_refuses_nul_characters_clearly(postgres_url):
    reset_postgres(postgres_url)
    store = PostgreSQLStore(postgres_url)
    store.create(record())
    for call in (
        lambda: store.append("s1", [Message("user", "a\x00b")], now=1.0),
        lambda: store.update("s1", 1.0, metadata={"k": "a\x00b"}),
        lambda: store.create(record("s2", system_prompt="\x00")),
        lambda: store.create(record("s2", kv=KVReport("host", 1, "r\x00"))),
        lambda: store.append("s1", [U1], now=1.0, kv=KVReport("host", 1, "r\x00")),
    ):
        with pytest.raises(InvalidRequest, match=r"NUL|cannot store"):
            call()
    assert store.messages("s1") == [] and store.get("s1") == record() and store.count() == 1
    store.close()


def test_postgresql_lease_writes_skip_the_flush_wait_for_their_own_commit_only(postgres_url):
    """Lease writes commit without waiting for the WAL flush; the setting must not outlive them on the pooled
    connection, or every later append on it (a turn's commit) would stop being durable."""
    reset_postgres(postgres_url)
    joiner = "&" if "?" in postgres_url else "?"
    store = PostgreSQLStore(f"{postgres_url}{joiner}pool_size=1&options=-csynchronous_commit%3Don")
    store.create(record())
    for take in (lambda: store.acquire_lease("s1", "turn-a", ttl_s=60), lambda: store.load("s1", lease=LEASE_A)):
        take()
        with store._conn() as conn:  # the pool's only connection: the one the lease was written on
            assert conn.execute("SELECT current_setting('synchronous_commit')").fetchone() == ("on",)
    store.append("s1", [U1], now=150.0, holder="turn-a")
    store.release_lease("s1", "turn-a")
    with store._conn() as conn:
        assert conn.execute("SELECT current_setting('synchronous_commit')").fetchone() == ("on",)
    with psycopg.connect(postgres_url) as other:  # both lease writes committed
        assert other.execute("SELECT lease_holder FROM sessionserve_sessions").fetchone() == (None,)
    assert store.messages("s1") == [U1]
    store.acquire_lease("s1", "turn-b", ttl_s=60)  # released: another turn may take it
    store.close()


def test_postgresql_passes_libpq_options_with_spaces_from_the_url(postgres_url):
    """`?options=-c name=value` (percent-encoded) reaches the server as written, next to our own query parameters."""
    options = quote("-c application_name=sessionserve-options-test")
    store = PostgreSQLStore(f"{postgres_url}?options={options}&timeout=3")
    store.ping()
    with psycopg.connect(postgres_url) as conn:
        names = {name for (name,) in conn.execute("SELECT application_name FROM pg_stat_activity")}
    assert "sessionserve-options-test" in names
    store.close()


def test_open_store_picks_the_network_backends(postgres_url, redis_url):
    reset_postgres(postgres_url)
    for url, kind in ((postgres_url, PostgreSQLStore), (f"{redis_url}?prefix=pick:", RedisStore)):
        store = open_store(url, idle_ttl_s=123.0)
        assert isinstance(store, kind) and store.idle_ttl_s == 123.0
        store.close()
    pg = open_store(postgres_url.replace("postgresql://", "postgres://"))
    assert isinstance(pg, PostgreSQLStore)
    pg.close()


# ---- Redis -----------------------------------------------------------------------------------------------
@pytest.fixture
def raw_redis(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def test_redis_keys_live_under_the_prefix_with_a_ttl_paused_by_a_lease(redis_url, raw_redis):
    store = RedisStore(f"{redis_url}?prefix=layout-1:", idle_ttl_s=600)
    store.create(record())
    store.append("s1", [U1, A1], now=150.0)
    store.create(record("n1", owner=None))
    keys = set(raw_redis.keys("*"))
    mine = {k for k in keys if k.startswith("layout-1:")}
    assert mine == {
        "layout-1:s:s1",
        "layout-1:m:s1",
        "layout-1:active",
        "layout-1:owner:alice",
        "layout-1:s:n1",
        "layout-1:owner-none",
    }
    for key in ("layout-1:s:s1", "layout-1:m:s1", "layout-1:s:n1"):
        assert 590_000 < raw_redis.pttl(key) <= 600_000
    assert raw_redis.lrange("layout-1:m:s1", 0, -1) == ['["user", "u1"]', '["assistant", "a1"]']
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    assert raw_redis.pttl("layout-1:s:s1") == -1 and raw_redis.pttl("layout-1:m:s1") == -1  # never mid-turn
    store.append("s1", [U1], now=160.0, holder="turn-a")
    assert raw_redis.pttl("layout-1:m:s1") == -1
    store.release_lease("s1", "turn-a")
    assert min(raw_redis.pttl("layout-1:s:s1"), raw_redis.pttl("layout-1:m:s1")) > 590_000
    store.delete("s1")
    store.delete("n1")
    assert {k for k in raw_redis.keys("layout-1:*")} == set()
    store.close()


def test_redis_keeps_a_kv_report_as_record_fields_absent_until_reported(redis_url, raw_redis):
    store = RedisStore(f"{redis_url}?prefix=kv-1:")
    fields = ("kv_tier", "kv_tokens", "kv_replica")
    store.create(record())
    store.append("s1", [U1], now=150.0)
    assert not set(fields) & set(raw_redis.hkeys("kv-1:s:s1"))
    store.append("s1", [A1], now=160.0, kv=KVReport("host", 9, "r2"))
    assert raw_redis.hmget("kv-1:s:s1", fields) == ["host", "9", "r2"]
    assert raw_redis.lrange("kv-1:m:s1", 0, -1) == ['["user", "u1"]', '["assistant", "a1"]']
    assert store.clear("s1", 165.0) == KVReport("host", 9, "r2")
    assert not set(fields) & set(raw_redis.hkeys("kv-1:s:s1"))
    store.append("s1", [U1], now=170.0, kv=KVReport("device", 3, "r2"))
    assert store.update("s1", 175.0, system_prompt="Be verbose.")[1] == KVReport("device", 3, "r2")
    assert not set(fields) & set(raw_redis.hkeys("kv-1:s:s1"))
    store.create(record("s2", kv=KVReport("device", 4, "")))
    assert raw_redis.hmget("kv-1:s:s2", fields) == ["device", "4", ""]
    store.delete("s1")
    store.delete("s2")
    assert raw_redis.keys("kv-1:*") == []
    store.close()


def test_redis_expires_idle_sessions_itself_and_keeps_count_and_list_right(redis_url, raw_redis):
    store = RedisStore(f"{redis_url}?prefix=ttl-1:", idle_ttl_s=0.5)
    now = time.time()
    store.create(record("gone", now=now))
    store.create(record("kept", now=now))
    store.append("gone", [U1], now=now)
    store.acquire_lease("kept", "turn-a", ttl_s=60)
    time.sleep(0.8)
    assert store.get("gone") is None and raw_redis.exists("ttl-1:m:gone") == 0
    assert store.count() == 1
    assert [r.session_id for r in store.list("alice")] == ["kept"]
    assert store.missing(["gone", "kept"]) == ["gone"]
    store.release_lease("kept", "turn-a")  # idle again: the countdown restarts
    time.sleep(0.8)
    assert store.count() == 0
    assert store.list("alice") == []  # list drops the owner's expired entries
    assert raw_redis.keys("ttl-1:*") == []
    store.close()


def test_redis_expire_idle_reports_what_the_server_expired(redis_url):
    store = RedisStore(f"{redis_url}?prefix=ttl-2:", idle_ttl_s=0.2)
    store.create(record("a", now=10.0))
    time.sleep(0.4)
    assert store.expire_idle(100.0) == ["a"]
    assert store.expire_idle(100.0) == []
    store.close()


def test_a_wrong_password_says_so_without_showing_any_password(postgres_server, redis_server):
    for server in (postgres_server, redis_server):
        wrong = server.url.replace(server.password, "not-the-password-123")
        with pytest.raises(StoreUnavailable, match=r"(?i)auth|password") as caught:
            open_store(wrong).ping()
        assert "not-the-password-123" not in str(caught.value) and server.password not in str(caught.value)


WRITER = """
import sys, time
from sessions.messages import Message
from sessions.store import open_store
store = open_store(sys.argv[1])
name, start_at = sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start_at - time.time()))  # both processes start writing together
for i in range(25):
    store.append("s1", [Message("user", f"{name}:{i}"), Message("assistant", f"{name}:{i}")], now=float(i))
store.close()
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "redis"])
def test_appends_from_two_processes_are_never_lost_doubled_or_reordered(backend, store, store_url):
    store.create(record())
    start_at = str(time.time() + 1.5)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, store_url, name, start_at], cwd=REPO) for name in ("p0", "p1")
    ]
    assert [writer.wait(timeout=60) for writer in writers] == [0, 0]
    history = store.messages("s1")
    assert len(history) == 100
    pairs = list(zip(history[::2], history[1::2], strict=True))
    assert all(u.role == "user" and a.role == "assistant" and u.content == a.content for u, a in pairs)
    for name in ("p0", "p1"):
        assert [u.content for u, _ in pairs if u.content.startswith(name)] == [f"{name}:{i}" for i in range(25)]
