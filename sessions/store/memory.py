"""In-process history store: for tests and throwaway servers. Lost on restart, invisible to other processes."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from sessions.errors import SessionExists
from sessions.messages import Message
from sessions.store.base import SessionRecord, check_messages, check_window, not_found


@dataclass(slots=True)
class _Session:
    record: SessionRecord
    messages: list[Message] = field(default_factory=list)


def _copy(record: SessionRecord) -> SessionRecord:
    # A JSON round trip, not deepcopy: metadata then behaves exactly as it does in the SQLite store.
    return replace(record, metadata=json.loads(json.dumps(record.metadata)))


class MemoryStore:
    """A dict behind one lock; records are copied in and out so callers cannot mutate stored state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise not_found(session_id)
        return session

    def create(self, record: SessionRecord) -> None:
        stored = _copy(record)
        with self._lock:
            if record.session_id in self._sessions:
                raise SessionExists(f"session {record.session_id!r} already exists: pick another id or omit it")
            self._sessions[record.session_id] = _Session(stored)

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            session = self._sessions.get(session_id)
            return None if session is None else _copy(session.record)

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def append(self, session_id: str, messages: Sequence[Message], now: float) -> None:
        batch = check_messages(messages)
        with self._lock:
            session = self._session(session_id)
            session.messages.extend(batch)
            session.record.last_active_at = now

    def messages(self, session_id: str, window: int | None = None) -> list[Message]:
        check_window(window)
        with self._lock:
            stored = self._session(session_id).messages
            return list(stored if window is None else stored[-window:])

    def message_count(self, session_id: str) -> int:
        with self._lock:
            return len(self._session(session_id).messages)

    def clear(self, session_id: str) -> None:
        with self._lock:
            self._session(session_id).messages.clear()

    def touch(self, session_id: str, now: float) -> None:
        with self._lock:
            self._session(session_id).record.last_active_at = now

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def idle_since(self, before: float) -> list[str]:
        with self._lock:
            records = [s.record for s in self._sessions.values() if s.record.last_active_at < before]
            return [r.session_id for r in sorted(records, key=lambda r: r.last_active_at)]

    def missing(self, session_ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [session_id for session_id in session_ids if session_id not in self._sessions]

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
