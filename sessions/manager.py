"""SessionManager: lifecycle, validation, ownership, per-session turn ordering, idle expiry and limits.

Every request is validated completely before the store is touched, so a refused request changes nothing.
The manager reaches the engine only through EngineClient.release: history is the source of truth and KV is a
cache of it, so whenever history shrinks or disappears the session's KV must go.

A turn holds two locks: this process's asyncio lock (turns of a session run in arrival order here) and the store's
lease (other processes' edits get SessionBusy, idle expiry skips the session). Edits made by this process during its
own turn act as the lease holder, as before leases existed; edits from elsewhere pass no holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, Protocol, TypeVar

from sessions.errors import InvalidRequest, SessionBusy, SessionError, SessionNotFound, TooManySessions
from sessions.held import HeldHistories
from sessions.lease import TurnLease
from sessions.messages import Message, parse_messages
from sessions.store import base, loop_io
from sessions.store.base import HistoryStore, SessionRecord
from sessions.store.values import KV_POLICIES, UNCHANGED, Holder, KVUpdate, Metadata, Prompt, Unchanged

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class EngineClient(Protocol):
    """All the manager needs from the engine: forget the KV held under a session's cache key, list the keys."""

    def release(self, cache_key: str) -> None: ...

    def cache_keys(self) -> list[str]: ...


@dataclass(slots=True)
class Turn:
    """A running turn: its store lease and the session as read when the lease was taken (its whole history: what this
    process held of it, and the messages the load read after that)."""

    lease: TurnLease
    record: SessionRecord
    history: list[Message]


@dataclass(slots=True)
class _TurnLock:
    """A session's lock plus how many turns hold or await it, so idle locks can be dropped instead of leaking."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    holder: Holder = None  # the store lease of the turn running now, if any


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidRequest(
            f"session id {session_id!r} is invalid: use 1-128 characters from letters, digits and . _ : -"
        )
    return session_id


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest(f"metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode("utf-8")  # NaN and lone surrogates too
    except (TypeError, ValueError) as error:
        raise InvalidRequest(f"metadata must be JSON-serialisable: {error}") from None
    return metadata


def _check_kv_policy(kv_policy: object) -> str:
    if kv_policy not in KV_POLICIES:
        raise InvalidRequest(f"kv must be one of {', '.join(KV_POLICIES)}, got {kv_policy!r}")
    assert isinstance(kv_policy, str)
    return kv_policy


def _check_system_prompt(system_prompt: object) -> str | None:
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidRequest(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    return system_prompt


def _check_conversation(messages: Sequence[Any]) -> list[Message]:
    """Parse stored-history messages; system messages are refused because the system prompt lives on the record."""
    parsed = parse_messages(messages)
    for index, message in enumerate(parsed):
        if message.role == "system":
            raise InvalidRequest(
                f"messages[{index}]: a system message cannot be part of the history; set system_prompt instead"
            )
    return parsed


class SessionManager:
    """The one place that decides what a session may do; the store only stores and the engine only computes."""

    def __init__(
        self,
        store: HistoryStore,
        engine: EngineClient | None = None,
        *,
        max_sessions: int = 10000,
        idle_ttl_s: float = 86400,
        lease_ttl_s: float = 300.0,
        release_unreported: bool = True,
        default_kv: str = "pinned",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if idle_ttl_s <= 0:
            raise ValueError(f"idle_ttl_s must be > 0 seconds, got {idle_ttl_s}")
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0 seconds, got {lease_ttl_s}")
        self.lease_ttl_s = lease_ttl_s  # a turn's lease lasts this long unless renewed (every third of it)
        # False where the engine is another process (the ingress): releasing costs a call, so it is made only for
        # sessions whose record reports KV; a replica's orphan sweep frees any KV the store never heard of.
        self.release_unreported = release_unreported
        self.default_kv = _check_kv_policy(default_kv)
        self.store = store
        self.engine = engine
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._turn_locks: dict[str, _TurnLock] = {}
        self._held = HeldHistories()  # what this process's turns read: the next turn reads only what came after

    async def store_call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn` (this manager's or the store's methods, or code calling them) from an event loop without blocking it:
        on the loop with the store's I/O awaited where the store can (`runs_on_loop`), else in a worker thread."""
        return await loop_io.call(self.store, fn, *args, **kwargs)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def create(
        self,
        session_id: str | None = None,
        *,
        system_prompt: str | None = None,
        messages: Sequence[Any] = (),
        metadata: dict[str, Any] | None = None,
        owner: str | None = None,
        kv_policy: str | None = None,
    ) -> SessionRecord:
        """Create a session (uuid4 hex id if none) with optional history; all validated before anything is stored.

        `kv_policy` (pinned, evictable, none; None: the manager's `default_kv`) says what its KV is worth keeping."""
        session_id = uuid.uuid4().hex if session_id is None else _check_session_id(session_id)
        kv_policy = self.default_kv if kv_policy is None else _check_kv_policy(kv_policy)
        system_prompt = _check_system_prompt(system_prompt)
        history = _check_conversation(messages)
        metadata = _check_metadata(metadata)
        now = self._clock()
        record = SessionRecord(session_id, system_prompt, metadata, now, now, owner, kv_policy=kv_policy)
        try:  # the store checks the limit as part of the insert, so max_sessions holds across every process using it
            self.store.create(record, limit=self.max_sessions)  # SessionExists if the id is taken
        except TooManySessions:
            self.expire_idle()
            try:
                self.store.create(record, limit=self.max_sessions)
            except TooManySessions:
                raise TooManySessions(
                    f"the server already holds its maximum of {self.max_sessions} sessions: destroy sessions "
                    "you no longer need, or raise sessions.max_sessions"
                ) from None
        if history:
            try:
                self.store.append(session_id, history, now)
            except BaseException:
                self.store.delete(session_id)  # a half-created session must not survive
                raise
        return record

    def get(self, session_id: str, owner: str | None = None) -> SessionRecord:
        """The record; SessionNotFound also when `owner` differs, so callers cannot probe others' ids."""
        return base.visible(self.store.get(session_id), session_id, owner)

    def destroy(self, session_id: str, owner: str | None = None) -> None:
        """Delete history and record, and free the session's KV."""
        record = self.store.delete(session_id, holder=self._holder(session_id), owner=owner)
        if record is None:
            raise base.not_found(session_id)
        self._turn_locks.pop(session_id, None)
        self._release(session_id, record.kv)

    def count(self) -> int:
        return self.store.count()

    def expire_idle(self) -> list[str]:
        """Destroy sessions idle longer than idle_ttl_s, except those running a turn (they hold the store's lease).

        Sessions with a turn queued here count as active: they are touched first, so a turn waiting for the
        session's lock never finds its session expired. Returns the ids expired.
        """
        now = self._clock()
        for session_id, entry in list(self._turn_locks.items()):
            if entry.users and entry.holder is None:
                with contextlib.suppress(SessionError):
                    self.store.touch(session_id, now)
        expired = self.store.expire_idle(now - self.idle_ttl_s)
        for session_id in expired:
            self._turn_locks.pop(session_id, None)
            self._release(session_id)
        if expired:
            log.info("expired %d idle sessions", len(expired))
        self.release_orphans()
        return expired

    def list_sessions(self, owner: str | None = None, limit: int = 50, offset: int = 0) -> list[SessionRecord]:
        """The owner's sessions (None: those created without an owner), most recently active first, one page."""
        base.check_page(limit, offset)
        return self.store.list(owner, limit, offset)

    def update(
        self, session_id: str, owner: str | None = None, *, system_prompt: Prompt = UNCHANGED, metadata: Metadata = None
    ) -> SessionRecord:
        """Set the system prompt (None clears it) and/or replace the metadata, validated as in create.

        A new system prompt changes the start of every prompt, so the session's KV no longer matches: free it.
        """
        if not isinstance(system_prompt, Unchanged):
            system_prompt = _check_system_prompt(system_prompt)
        if metadata is not None:
            metadata = _check_metadata(metadata)
        record, freed = self.store.update(
            session_id,
            self._clock(),
            system_prompt=system_prompt,
            metadata=metadata,
            holder=self._holder(session_id),
            owner=owner,
        )
        if freed is not None:
            self._release(session_id, freed)
        return record

    def release_orphans(self) -> list[str]:
        """Free KV held for sessions no longer in the store: another replica destroyed or expired them.

        With several replicas each one's KV lives where the session's turns ran, but any replica may delete the
        record; this sweep (run with idle expiry) is how the owner learns. Returns the keys released.
        """
        if self.engine is None:
            return []
        try:
            keys = self.engine.cache_keys()
        except Exception:
            log.exception("engine failed to list its cache keys")
            return []
        orphans = self.store.missing([key for key in keys if key not in self._turn_locks])
        for key in orphans:
            self._release(key)
        if orphans:
            log.info("released the KV of %d sessions destroyed elsewhere", len(orphans))
        return orphans

    # ---- history -----------------------------------------------------------------------------------
    def load(
        self, session_id: str, owner: str | None = None, window: int | None = None
    ) -> tuple[SessionRecord, list[Message]]:
        """The record and its last `window` messages (all if None), oldest first, in one store call."""
        return self.store.load(session_id, window, owner=owner)

    def history(self, session_id: str, window: int | None = None, owner: str | None = None) -> list[Message]:
        """The last `window` messages (all if None), oldest first; the system prompt is on the record."""
        return self.load(session_id, owner, window)[1]

    def append(self, session_id: str, messages: Sequence[Any], owner: str | None = None) -> list[Message]:
        """Add messages without generating; the messages as stored (content parts joined into text). Not the whole
        history: an append then costs the same however long the conversation is, so importing one in pieces stays
        linear. The session's KV stays valid: history only grows."""
        parsed = _check_conversation(messages)
        if not parsed:
            raise InvalidRequest("messages is empty: send at least one {role, content} message to append")
        self.store.append(session_id, parsed, self._clock(), holder=self._holder(session_id), owner=owner)
        return parsed

    def clear(self, session_id: str, owner: str | None = None) -> None:
        """Delete the messages but keep the session and its system prompt; its KV no longer matches, so free it."""
        freed = self.store.clear(session_id, self._clock(), holder=self._holder(session_id), owner=owner)
        self._release(session_id, freed)

    def commit_turn(
        self,
        session_id: str,
        new_messages: Sequence[Message],
        reply: Message,
        *,
        holder: Holder = None,
        kv: KVUpdate = None,
        release: bool = False,
    ) -> None:
        """Store a finished turn in one atomic append, so a failed or cancelled generation leaves no half turn.

        `holder` is the turn's lease (turn()'s `lease.holder`); by default the lease of this process's running turn.
        `kv` is the replica's report of the session's KV after the turn, stored in that same append (None: keep
        the record's), so session info read from the store shows it. `release` gives the lease back in it too:
        `commit` does that for a running turn.
        """
        parsed = _check_conversation([*new_messages, reply])
        if parsed[-1].role != "assistant":
            raise InvalidRequest(f"a turn's reply must be an assistant message, got role {parsed[-1].role!r}")
        holder = holder or self._holder(session_id)
        self.store.append(session_id, parsed, self._clock(), holder=holder, kv=kv, release=release)

    async def commit(self, turn: Turn, new_messages: Sequence[Message], reply: Message, kv: KVUpdate = None) -> None:
        """commit_turn for a running turn, its lease given back in the same write (one round trip, not two)."""
        await turn.lease.ending()
        holder = turn.lease.holder
        session_id = turn.record.session_id
        await self.store_call(self.commit_turn, session_id, new_messages, reply, holder=holder, kv=kv, release=True)
        turn.lease.given_back()

    # ---- turn ordering -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def turn(self, session_id: str, owner: str | None = None, *, wait: bool = True) -> AsyncIterator[Turn]:
        """Hold the session for one turn; yields the Turn: its lease and the session's record and whole history,
        read as the lease was taken (one store call: only the messages appended since this process's last turn of the
        session, if it holds that turn's history). `commit` stores the turn and gives the lease back.

        Turns here run strictly in arrival order (asyncio.Lock is FIFO); with wait=False a turn already running here
        raises SessionBusy instead of queueing, and a turn that would queue first checks the session exists (and is
        `owner`'s): 404 at once, not after the turn ahead. The store lease is taken once the local lock is held and
        renewed every lease_ttl_s / 3 until the turn ends; a lease held by another process raises SessionBusy.
        """
        entry = self._turn_locks.get(session_id)
        if entry is None:
            entry = self._turn_locks[session_id] = _TurnLock()
        if not wait and entry.lock.locked():
            raise SessionBusy(
                f"session {session_id!r} is already running a turn: wait for it to finish (or cancel it) and retry"
            )
        entry.users += 1
        try:
            await self._queue_for(entry, session_id, owner)
            try:
                held = self._held.get(session_id)
                lease = TurnLease(
                    self.store, session_id, self.lease_ttl_s, owner, None if held is None else held.prefix
                )
                async with lease as (record, messages):
                    history = self._held.loaded(session_id, held, record, messages)
                    entry.holder = lease.holder
                    try:
                        yield Turn(lease, record, history)
                    finally:
                        entry.holder = None
            except SessionNotFound:
                self._held.forget(session_id)
                raise
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0 and self._turn_locks.get(session_id) is entry:
                del self._turn_locks[session_id]

    async def _queue_for(self, entry: _TurnLock, session_id: str, owner: str | None) -> None:
        """Acquire the session's lock in arrival order. A turn that has to wait checks meanwhile that the session is
        there and `owner`'s, so a caller who may not see it learns nothing from how long its 404 took."""
        if not entry.lock.locked():
            await entry.lock.acquire()
            return
        acquiring = asyncio.ensure_future(entry.lock.acquire())  # its place in the queue, taken now
        try:
            await self.store_call(self.get, session_id, owner)
            await acquiring
        except BaseException:
            if acquiring.done() and not acquiring.cancelled():
                entry.lock.release()
            else:
                acquiring.cancel()
            raise

    def turns_in(self, session_id: str) -> int:
        """How many turns of this process hold or await the session (a background warm-up yields to a second)."""
        entry = self._turn_locks.get(session_id)
        return 0 if entry is None else entry.users

    def _holder(self, session_id: str) -> str | None:
        """The lease of this process's running turn on the session: its own edits act as that turn."""
        entry = self._turn_locks.get(session_id)
        return None if entry is None else entry.holder

    def _release(self, session_id: str, reported: KVUpdate = None) -> None:
        """Free the session's KV (and the history its turns here hold: not needed to stay correct, the store's
        history id says when to read it all again, but no use any more); `reported` is its record's KV report before
        the change, when known."""
        self._held.forget(session_id)
        if self.engine is None:
            return
        if not self.release_unreported and reported is not None and reported.tier == "none":
            return
        try:
            self.engine.release(session_id)
        except Exception:  # the history change already happened; a KV leak must not turn it into an error
            log.exception("engine failed to release the KV of session %r", session_id)
