"""In-process history store: for tests and throwaway servers. Lost on restart, invisible to other processes."""

from __future__ import annotations

import builtins  # the stores have a `list` method, so their annotations say builtins.list
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from sessions.messages import Message
from sessions.store import base
from sessions.store.base import SessionRecord
from sessions.store.values import (
    UNCHANGED,
    HistoryPrefix,
    Holder,
    KVReport,
    KVUpdate,
    Lease,
    Metadata,
    Owner,
    Prompt,
    Unchanged,
    new_history_id,
)


@dataclass(slots=True)
class _Session:
    record: SessionRecord
    messages: list[Message] = field(default_factory=list)
    lease_holder: Holder = None
    lease_until: float | None = None


def _copy(record: SessionRecord) -> SessionRecord:
    # A JSON round trip, not deepcopy: metadata then behaves exactly as it does in the SQL stores.
    return replace(record, metadata=json.loads(json.dumps(record.metadata)))


def _last(messages: list[Message], window: int | None) -> list[Message]:
    return list(messages if window is None else messages[-window:])


def _extend(session: _Session, batch: list[Message], now: float, kv: KVUpdate) -> None:
    session.messages.extend(batch)
    session.record.last_active_at = now
    if kv is not None:
        session.record.kv = kv


class MemoryStore:
    """A dict behind one lock; records are copied in and out so callers cannot mutate stored state.

    `idle_ttl_s` is accepted for a uniform constructor (the manager drives expiry through expire_idle);
    `clock` is the lease clock (wall time).
    """

    runs_on_loop = False  # its lock may be held by a worker thread (engine-side calls): never wait for it on a loop

    def __init__(self, *, idle_ttl_s: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise base.not_found(session_id)
        return session

    def _writable(self, session_id: str, holder: str | None) -> _Session:
        session = self._session(session_id)
        if base.lease_is_foreign(session.lease_holder, session.lease_until, holder, self._clock()):
            raise base.busy(session_id)
        return session

    def _owned_writable(self, session_id: str, holder: str | None, owner: Owner) -> _Session:
        """Not found before busy: another owner's session says nothing about its lease."""
        base.visible(self._session(session_id).record, session_id, owner)
        return self._writable(session_id, holder)

    def create(self, record: SessionRecord, *, limit: int | None = None) -> None:
        stored = _copy(record)
        with self._lock:
            if record.session_id in self._sessions:
                raise base.exists(record.session_id)
            if limit is not None and len(self._sessions) >= limit:
                raise base.full(limit)
            self._sessions[record.session_id] = _Session(stored)

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            session = self._sessions.get(session_id)
            return None if session is None else _copy(session.record)

    def delete(self, session_id: str, *, holder: Holder = None, owner: Owner = None) -> SessionRecord | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or not base.owned_by(session.record, owner):
                return None
            self._writable(session_id, holder)
            del self._sessions[session_id]
            return _copy(session.record)

    def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        now: float,
        *,
        holder: Holder = None,
        kv: KVUpdate = None,
        owner: Owner = None,
        release: bool = False,
    ) -> None:
        batch = base.check_messages(messages)
        base.check_release(holder, release)
        with self._lock:
            session = self._owned_writable(session_id, holder, owner)
            _extend(session, batch, now, kv)
            if release and session.lease_holder == holder:
                session.lease_holder = session.lease_until = None

    def messages(self, session_id: str, window: int | None = None) -> builtins.list[Message]:
        base.check_window(window)
        with self._lock:
            return _last(self._session(session_id).messages, window)

    def load(
        self,
        session_id: str,
        window: int | None = None,
        *,
        owner: Owner = None,
        lease: Lease | None = None,
        after: HistoryPrefix | None = None,
    ) -> tuple[SessionRecord, builtins.list[Message]]:
        base.check_window(window)
        base.check_after(after, window, lease)
        if lease is not None:
            base.check_lease(*lease)
        with self._lock:
            session = self._session(session_id)
            record = base.visible(session.record, session_id, owner)
            if lease is not None:
                self._take(session_id, lease)
            start = base.start_after(record.history_id, after)
            return _copy(record), _last(session.messages, window)[start:]

    def clear(self, session_id: str, now: float, *, holder: Holder = None, owner: Owner = None) -> KVReport:
        with self._lock:
            session = self._owned_writable(session_id, holder, owner)
            session.messages.clear()
            session.record.history_id = new_history_id()
            freed, session.record.kv = session.record.kv, KVReport()
            session.record.last_active_at = now
            return freed

    def update(
        self,
        session_id: str,
        now: float,
        *,
        system_prompt: Prompt = UNCHANGED,
        metadata: Metadata = None,
        holder: Holder = None,
        owner: Owner = None,
    ) -> tuple[SessionRecord, KVReport | None]:
        copied = None if metadata is None else json.loads(json.dumps(metadata))
        with self._lock:
            record = self._owned_writable(session_id, holder, owner).record
            freed = None
            if not isinstance(system_prompt, Unchanged) and system_prompt != record.system_prompt:
                freed, record.system_prompt, record.kv = record.kv, system_prompt, KVReport()
            if copied is not None:
                record.metadata = copied
            record.last_active_at = now
            return _copy(record), freed

    def touch(self, session_id: str, now: float) -> None:
        with self._lock:
            self._session(session_id).record.last_active_at = now

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def list(self, owner: str | None, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page(lambda record: record.owner == owner, limit, offset)

    def recent(self, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        return self._page(lambda record: True, limit, offset)

    def _page(self, keep: Callable[[SessionRecord], bool], limit: int, offset: int) -> builtins.list[SessionRecord]:
        base.check_page(limit, offset)
        with self._lock:
            records = [s.record for s in self._sessions.values() if keep(s.record)]
            records.sort(key=lambda r: (r.last_active_at, r.session_id), reverse=True)
            return [_copy(r) for r in records[offset : offset + limit]]

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> None:
        base.check_lease(holder, ttl_s)
        with self._lock:
            self._take(session_id, Lease(holder, ttl_s))

    def _take(self, session_id: str, lease: Lease) -> None:
        """Under the lock."""
        session = self._writable(session_id, lease.holder)
        session.lease_holder, session.lease_until = lease.holder, self._clock() + lease.ttl_s

    def release_lease(self, session_id: str, holder: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.lease_holder == holder:
                session.lease_holder = session.lease_until = None

    def expire_idle(self, before: float) -> builtins.list[str]:
        with self._lock:
            now = self._clock()
            idle = [
                s.record
                for s in self._sessions.values()
                if s.record.last_active_at < before
                and not base.lease_is_foreign(s.lease_holder, s.lease_until, None, now)
            ]
            idle.sort(key=lambda r: r.last_active_at)
            for record in idle:
                del self._sessions[record.session_id]
            return [r.session_id for r in idle]

    def missing(self, session_ids: Sequence[str]) -> builtins.list[str]:
        with self._lock:
            return [session_id for session_id in session_ids if session_id not in self._sessions]

    def ping(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
