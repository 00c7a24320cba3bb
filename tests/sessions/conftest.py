from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sessions.store.base import HistoryStore
from sessions.store.memory import MemoryStore
from sessions.store.sqlite import SQLiteStore

BACKENDS = ["memory", "sqlite", "postgresql", "redis"]
StoreFactory = Callable[..., HistoryStore]


def reset_postgres(url: str) -> None:
    """A fresh database for the next test: drop our tables (the store recreates them at start-up)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS sessionserve_messages, sessionserve_sessions, sessionserve_schema, sessionserve_count"
            " CASCADE"
        )
        conn.execute("DROP FUNCTION IF EXISTS sessionserve_count_sessions, sessionserve_count_reset")
        conn.execute("DROP PROCEDURE IF EXISTS sessionserve_create")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, request, tmp_path) -> str:
    """Where this test's backend keeps its data: a new file, emptied PostgreSQL tables, or a new Redis prefix."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
        return url
    return f"{request.getfixturevalue('redis_url')}?prefix=t-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def open_backend(backend, store_url) -> Iterator[StoreFactory]:
    """Opens more store objects on this test's data (for memory: the same object, nothing else can share it)."""
    opened: list[HistoryStore] = []
    memory: list[MemoryStore] = []

    def open_one(**kwargs: Any) -> HistoryStore:
        store: HistoryStore
        if backend == "memory":
            if kwargs or not memory:
                memory.append(MemoryStore(**kwargs))
            store = memory[-1]
        elif backend == "sqlite":
            store = SQLiteStore(store_url.removeprefix("sqlite://"), **kwargs)
        elif backend == "postgresql":
            from sessions.store.postgresql import PostgreSQLStore

            store = PostgreSQLStore(store_url, **kwargs)
        else:
            from sessions.store.redis import RedisStore

            store = RedisStore(store_url, **kwargs)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend) -> HistoryStore:
    """Every HistoryStore backend (real PostgreSQL and Redis servers), fresh per test."""
    return open_backend()


class FakeClock:
    """A clock the test moves by hand, so TTL behaviour is exact and instant."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingEngine:
    """The sessions package's own EngineClient protocol, recording which cache keys were released.

    `held` stands for the keys KV is held under; a test adds to it what a turn would have cached.
    """

    def __init__(self) -> None:
        self.released: list[str] = []
        self.held: set[str] = set()

    def release(self, cache_key: str) -> None:
        self.released.append(cache_key)
        self.held.discard(cache_key)

    def cache_keys(self) -> list[str]:
        return sorted(self.held)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()
