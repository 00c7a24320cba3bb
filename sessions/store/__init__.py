"""History stores behind one protocol; `open_store(url)` picks the backend from the configured URL."""

from __future__ import annotations

from sessions.store.base import HistoryStore, SessionRecord
from sessions.store.memory import MemoryStore
from sessions.store.sqlite import SQLiteStore

__all__ = ["HistoryStore", "MemoryStore", "SQLiteStore", "SessionRecord", "open_store"]

_SUPPORTED = "memory:// or sqlite:///ABSOLUTE/PATH.db"


def open_store(url: str) -> HistoryStore:
    """memory:// -> MemoryStore; sqlite:///abs/path.db (any number of slashes before the path) -> SQLiteStore."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/") or not path.strip("/"):
            raise ValueError(f"store URL {url!r} needs an absolute file path: use {_SUPPORTED}")
        return SQLiteStore("/" + path.lstrip("/"))  # sqlite:////abs (SQLAlchemy style) means the same file
    raise ValueError(f"unsupported store URL {url!r}: use {_SUPPORTED}")
