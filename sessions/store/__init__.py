"""History stores behind one protocol; `open_store(url)` picks the backend from the configured URL.

The network backends import their drivers only when chosen, so a sqlite user needs neither psycopg nor redis.
"""

from __future__ import annotations

from sessions.store.base import UNCHANGED, HistoryStore, KVReport, SessionRecord, Unchanged
from sessions.store.memory import MemoryStore
from sessions.store.sqlite import SQLiteStore

__all__ = [
    "UNCHANGED",
    "HistoryStore",
    "KVReport",
    "MemoryStore",
    "SQLiteStore",
    "SessionRecord",
    "Unchanged",
    "open_store",
]

_SUPPORTED = (
    "memory://, sqlite:///ABSOLUTE/PATH.db, postgresql://USER:PASSWORD@HOST:PORT/DB"
    " or redis[s]://[:PASSWORD@]HOST:PORT/N"
)


def open_store(url: str, *, idle_ttl_s: float = 86400.0) -> HistoryStore:
    """memory:// -> MemoryStore; sqlite:///abs/path.db (any number of slashes) -> SQLiteStore;
    postgresql:// (or postgres://) -> PostgreSQLStore; redis:// or rediss:// -> RedisStore (TTL = idle_ttl_s).
    """
    if url == "memory://":
        return MemoryStore(idle_ttl_s=idle_ttl_s)
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/") or not path.strip("/"):
            raise ValueError(f"store URL {url!r} needs an absolute file path: use {_SUPPORTED}")
        return SQLiteStore("/" + path.lstrip("/"), idle_ttl_s=idle_ttl_s)  # sqlite:////abs (SQLAlchemy) is the same
    if url.startswith(("postgresql://", "postgres://")):
        from sessions.store.postgresql import PostgreSQLStore

        return PostgreSQLStore(url, idle_ttl_s=idle_ttl_s)
    if url.startswith(("redis://", "rediss://")):
        from sessions.store.redis import RedisStore

        return RedisStore(url, idle_ttl_s=idle_ttl_s)
    raise ValueError(f"unsupported store URL {url!r}: use {_SUPPORTED}")
