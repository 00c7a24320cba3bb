from __future__ import annotations

import pytest

from sessions.store.memory import MemoryStore
from sessions.store.sqlite import SQLiteStore


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    """Every HistoryStore backend, fresh per test."""
    backend = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "sessions.db")
    yield backend
    backend.close()


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
