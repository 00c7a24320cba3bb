from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from sessions.store import loop_io
from sessions.store.base import HistoryStore
from sessions.store.memory import MemoryStore
from sessions.store.sqlite import SQLiteStore

ON_LOOP = "-on-loop"  # a network backend driven through its asyncio driver (loop_io.run), as the ingress drives it
BACKENDS = [
    "memory",
    "sqlite",
    "postgresql",
    "redis",
    *(pytest.param(f"{name}{ON_LOOP}", marks=pytest.mark.slow) for name in ("postgresql", "redis")),
]
StoreFactory = Callable[..., HistoryStore]


class OnLoop:
    """A network store whose every method call runs under loop_io.run on an event loop in another thread: the same
    methods, their I/O through the driver's asyncio twin. Tests call it from any thread, as they call a store."""

    runs_on_loop = False  # to a caller, a blocking store (each call waits for the loop)

    def __init__(self, store: HistoryStore, loop: asyncio.AbstractEventLoop) -> None:
        assert store.runs_on_loop
        self._store, self._loop = store, loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name == "close" or not callable(attr):
            return attr

        def on_loop(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(loop_io.run(attr, *args, **kwargs), self._loop).result()

        return on_loop


@pytest.fixture(scope="session")
def store_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One uvloop (what Ray's replicas run) in a thread of its own, for every OnLoop store of the session."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="store-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def reset_postgres(url: str) -> None:
    """A fresh database for the next test: drop everything of ours (the store recreates it at start-up)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:  # tables, functions, procedures (every overload)
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, request, tmp_path) -> str:
    """Where this test's backend keeps its data: a new file, emptied PostgreSQL tables, or a new Redis prefix."""
    backend = backend.removesuffix(ON_LOOP)
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
def open_backend(backend, store_url, request) -> Iterator[StoreFactory]:
    """Opens more store objects on this test's data (for memory: the same object, nothing else can share it)."""
    opened: list[HistoryStore] = []
    memory: list[MemoryStore] = []
    on_loop = backend.endswith(ON_LOOP)
    backend = backend.removesuffix(ON_LOOP)

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
        return OnLoop(store, request.getfixturevalue("store_loop")) if on_loop else store  # type: ignore[return-value]

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
