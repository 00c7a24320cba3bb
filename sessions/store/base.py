"""What a history store keeps and the protocol every backend implements, so the manager never knows which one it has.

Leases: a turn holds a lease on its session (taken with its `load`, renewed by `acquire_lease`, given back with its
commit's `append`: two round trips per turn on a network store), so that idle expiry never removes the session mid-turn
and history edits from other processes (`append`, `clear`, `delete`, `update` with another or no `holder`) fail with
SessionBusy instead of interleaving with the turn. Lease times are the caller's wall clock (`time.time()`), on every
backend, so the hosts sharing a store need synchronised clocks (NTP); `now`/`before` arguments are the caller's too.
"""

from __future__ import annotations

import builtins  # the stores have a `list` method, so their annotations say builtins.list
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sessions.errors import InvalidRequest, SessionBusy, SessionExists, SessionNotFound, TooManySessions
from sessions.messages import Message
from sessions.store.values import (
    KV_POLICIES,
    UNCHANGED,
    HistoryPrefix,
    Holder,
    KVReport,
    KVUpdate,
    Lease,
    Metadata,
    Owner,
    Prompt,
    TokenUsage,
    Unchanged,
    new_history_id,
)

__all__ = [  # re-exported
    "KV_POLICIES",
    "UNCHANGED",
    "HistoryPrefix",
    "Holder",
    "KVReport",
    "KVUpdate",
    "Lease",
    "Metadata",
    "Owner",
    "Prompt",
    "TokenUsage",
    "Unchanged",
]

MAX_PAGE = 1000  # most records one list() call returns
MAX_OFFSET = 2**52  # list() offsets past this are past any store's end; backends clamp to it (exact as a Lua number)


@dataclass(slots=True)
class SessionRecord:
    """A session's fixed facts. The system prompt lives here, not among the messages, so trimming can never drop it.

    `kv` is the KV report of the last turn committed with one; history edits that invalidate the KV reset it.
    `kv_policy` ("pinned", "evictable" or "none", see KV_POLICIES) is chosen at creation and never changes.
    `history_id` names the session's current history: a fresh one at creation and at every clear, between which its
    messages are only ever appended to, so a caller holding a prefix of one history can read just the rest (`load`'s
    `after`). "" (a record stored before the id existed) names none.
    """

    session_id: str
    system_prompt: str | None
    metadata: dict[str, Any]
    created_at: float
    last_active_at: float
    owner: str | None = None
    kv: KVReport = field(default_factory=KVReport)
    kv_policy: str = "pinned"
    history_id: str = field(default_factory=new_history_id)

    def __post_init__(self) -> None:
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {', '.join(KV_POLICIES)}, got {self.kv_policy!r}")


class HistoryStore(Protocol):
    """Durable (or not) session records plus their ordered messages. Every method is safe to call from any thread.

    `holder` on a mutation names the lease the caller holds (None: none); the mutation raises SessionBusy while
    another holder's lease is unexpired. Network backends raise StoreUnavailable when the server cannot be reached.
    """

    # True: its methods may also run on an event loop under loop_io.run, their I/O awaited there (network stores
    # whose driver has an asyncio twin); False: callers on a loop run them in a worker thread (loop_io.call).
    runs_on_loop: bool

    def create(self, record: SessionRecord, *, limit: int | None = None) -> None:
        """Store a new record; SessionExists if the id is taken. With `limit`, TooManySessions if the store already
        holds that many: no create that succeeds passes the limit, whatever other processes create at the same time
        (creates racing at the limit may all be refused)."""
        ...

    def get(self, session_id: str) -> SessionRecord | None:
        """A copy of the record, or None; mutating it does not change the store."""
        ...

    def load(
        self,
        session_id: str,
        window: int | None = None,
        *,
        owner: Owner = None,
        lease: Lease | None = None,
        after: HistoryPrefix | None = None,
    ) -> tuple[SessionRecord, builtins.list[Message]]:
        """The record and its last `window` messages (all if None) for a caller who must own the session (`owner`;
        None: any caller): what a turn, the session's info and its history start from, in one round trip on a network
        store. SessionNotFound if missing or another owner's (see `owned_by`).

        With `lease`, first take or renew it as `acquire_lease` does, atomically with the read (what a turn starts
        with: no other holder's edit lands between them); SessionBusy if another holder's lease is unexpired.
        With the lease, `after` (a prefix of a history the caller holds, e.g. from its previous turn; not with a
        window): if the session's history is still that one, only the messages after the prefix, else all of them;
        the record's history_id tells which (`resumes`)."""
        ...

    def delete(self, session_id: str, *, holder: Holder = None, owner: Owner = None) -> SessionRecord | None:
        """Delete the record and its messages; the record as it was (its KV report says what to free), or None if
        there was nothing to delete: nothing of `owner`'s, when given (another owner's session is left alone)."""
        ...

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
        """Append all messages or none, and set last_active_at, for a caller who must own the session (`owner`;
        None: any caller); SessionNotFound if the session is missing or another owner's (see `owned_by`).

        `kv` (None: keep the record's) sets the record's KV report in the same atomic write as the messages; with
        `release`, `holder`'s lease is given back in it too, as `release_lease` does (what a turn ends with). One
        round trip on a network store, the owner check included.
        """
        ...

    def messages(self, session_id: str, window: int | None = None) -> builtins.list[Message]:
        """The last `window` messages (all if None), oldest first, no system prompt; SessionNotFound if missing."""
        ...

    def clear(self, session_id: str, now: float, *, holder: Holder = None, owner: Owner = None) -> KVReport:
        """Delete the messages, keep the record (and so the system prompt), reset the KV report and set
        last_active_at, for a caller who must own the session (`owner`; None: any caller); the KV report it reset
        (what to free). One round trip on a network store. SessionNotFound if missing or another owner's."""
        ...

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
        """Set the system prompt (None clears it) and/or replace the metadata (None keeps it), and last_active_at,
        for a caller who must own the session (`owner`); the new record, and the KV report a new system prompt
        reset (what to free; None when the prompt did not change). One round trip on a network store.

        A system prompt that differs from the stored one resets the KV report (the KV no longer matches), atomically.
        """
        ...

    def touch(self, session_id: str, now: float) -> None:
        """Set last_active_at; SessionNotFound if missing."""
        ...

    def count(self) -> int:
        """How many sessions exist."""
        ...

    def list(self, owner: str | None, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        """The owner's sessions (None: those created without an owner), most recently active first, one page."""
        ...

    def recent(self, limit: int = 50, offset: int = 0) -> builtins.list[SessionRecord]:
        """Every owner's sessions, most recently active first, one page (a replica looking for sessions it
        inherited from a lost one reads these)."""
        ...

    def acquire_lease(self, session_id: str, holder: str, ttl_s: float) -> None:
        """Take or renew (same holder) the session's lease for ttl_s; SessionBusy if another holder's is unexpired."""
        ...

    def release_lease(self, session_id: str, holder: str) -> None:
        """Give the lease back; a no-op if `holder` does not hold it (or the session is gone)."""
        ...

    def expire_idle(self, before: float) -> builtins.list[str]:
        """Delete sessions with last_active_at < before and no unexpired lease, atomically; their ids."""
        ...

    def missing(self, session_ids: Sequence[str]) -> builtins.list[str]:
        """Those of `session_ids` that have no record, in the given order (one query, not one per id)."""
        ...

    def ping(self) -> None:
        """Return if the store answers, else raise StoreUnavailable (the readiness probe)."""
        ...

    def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


def record_row(record: SessionRecord, metadata: object) -> tuple[object, ...]:
    """The record as the SQL backends store it (their column order), with its metadata encoded by the caller."""
    kv = record.kv
    row = (record.session_id, record.system_prompt, metadata, record.created_at, record.last_active_at, record.owner)
    return (*row, kv.tier, kv.tokens, kv.replica, kv.usage.to_json(), record.kv_policy, record.history_id)


def owned_by(record: SessionRecord, owner: Owner) -> bool:
    """Whether a caller may see the session: None (no caller identity: auth is off) sees every session. A caller who
    may not is told the session does not exist, so ids of others' sessions cannot be probed."""
    return owner is None or record.owner == owner


def visible(record: SessionRecord | None, session_id: str, owner: Owner) -> SessionRecord:
    """The record, if there is one and the caller may see it (`owned_by`); else SessionNotFound."""
    if record is None or not owned_by(record, owner):
        raise not_found(session_id)
    return record


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Refuse a batch containing anything but Messages before a backend writes any of it."""
    batch = list(messages)
    for index, message in enumerate(batch):
        if not isinstance(message, Message):
            raise TypeError(f"messages[{index}] is a {type(message).__name__}, not a Message: parse it first")
    return batch


def check_window(window: int | None) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise InvalidRequest(f"window must be a whole number >= 1 (or omitted for all messages), got {window!r}")


def check_page(limit: int, offset: int) -> None:
    """list() paging bounds: a page of 1..MAX_PAGE records starting at offset >= 0."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest(f"offset must be a whole number >= 0, got {offset!r}")


def check_after(after: HistoryPrefix | None, window: int | None, lease: Lease | None) -> None:
    if after is None:
        return
    if lease is None or window is not None:
        raise InvalidRequest("load(after=...) reads on from a held prefix for a turn: give a lease and no window")
    if not isinstance(after.history_id, str) or isinstance(after.length, bool) or not isinstance(after.length, int):
        raise InvalidRequest(f"after must be a HistoryPrefix(history_id: str, length: int), got {after!r}")
    if after.length < 0:
        raise InvalidRequest(f"after.length must be >= 0, got {after.length}")


def resumes(history_id: str, after: HistoryPrefix | None) -> bool:
    """Whether a load with `after` reads on from its prefix: the stored history (`history_id`) is still the one the
    prefix is of ("" names none, so never)."""
    return after is not None and history_id != "" and history_id == after.history_id


def start_after(history_id: str, after: HistoryPrefix | None) -> int:
    """The position a load's messages start from: after the held prefix if the history is still its own, else 0."""
    return after.length if after is not None and resumes(history_id, after) else 0


def check_release(holder: Holder, release: bool) -> None:
    if release and not holder:
        raise InvalidRequest("append(release=True) gives back the caller's lease: name it as holder")


def check_lease(holder: str, ttl_s: float) -> None:
    if not isinstance(holder, str) or not holder:
        raise InvalidRequest(f"a lease holder must be a non-empty string, got {holder!r}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s < float("inf"):
        raise InvalidRequest(f"a lease ttl_s must be a positive number of seconds, got {ttl_s!r}")


def lease_is_foreign(lease_holder: str | None, lease_until: float | None, holder: str | None, now: float) -> bool:
    """True when someone other than `holder` holds an unexpired lease: the caller must not mutate."""
    return lease_holder is not None and lease_holder != holder and lease_until is not None and lease_until > now


def not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"no session {session_id!r}: check the id, or create the session first")


def busy(session_id: str) -> SessionBusy:
    return SessionBusy(
        f"session {session_id!r} is running a turn (it holds a lease): wait for the turn to finish and retry"
    )


def full(limit: int) -> TooManySessions:
    return TooManySessions(f"the store already holds its limit of {limit} sessions")


def exists(session_id: str) -> SessionExists:
    return SessionExists(f"session {session_id!r} already exists: pick another id or omit it")
