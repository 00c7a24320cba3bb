"""Background warm-up of the sessions a replica inherits when another replica is lost.

After a loss the ring hands the lost replica's sessions to the survivors (and to its replacement once it runs), and
each one's next turn would recompute its whole history there. Every model replica watches the set of running
replicas; when it changes, it lists the store's sessions most recently active first and picks those whose last turn
ran on a replica that is no longer running, that the ring now gives to it, that held KV when last reported and
whose policy keeps KV (`inherited`). It warms at most `engine.inherit_warm_sessions` of them through the warm path
(`SessionService.warm`: the node's disk KV when its hash chain matches, else a recompute from the history), one at a
time and only while its engine has no other work: a warm-up starting is the lowest-priority work there is, and one
running is cancelled as soon as a turn needs the engine (a turn of that session takes over; another session's turn
lets it retry once the engine is idle again).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from serving.service import SessionService, WarmResult
from sessions.errors import SessionNotFound
from sessions.store.base import MAX_PAGE, SessionRecord

log = logging.getLogger(__name__)

SCAN_LIMIT = 20 * MAX_PAGE  # most records one look at the store reads, so a huge store cannot stall the replica
YIELD_CHECK_S = 0.02  # how often a running warm-up looks for a turn to yield to

Owner = Callable[[str], str | None]  # session id -> the replica the ring routes it to


def inherited(
    records: Iterable[SessionRecord],
    *,
    me: str,
    running: Container[str],
    owner: Owner,
    done: Container[str],
    limit: int,
) -> list[SessionRecord]:
    """The sessions to warm, in the order given (the store's: most recently active first), at most `limit`.

    Skipped: sessions whose last turn ran on a running replica (nothing was lost) or none yet, `kv: none` sessions
    (they keep no KV), sessions whose KV was already gone when their last turn was reported (tier "none": their next
    turn was going to be cold anyway), ones the ring gives to another replica, and `done` ones (warmed or taken over
    here before: if their KV has been evicted since, it stays evicted).
    """
    chosen: list[SessionRecord] = []
    for record in records:
        if len(chosen) == limit:
            break
        last = record.kv.replica
        if not last or last == me or last in running or record.kv_policy == "none" or record.kv.tier == "none":
            continue
        if record.session_id not in done and owner(record.session_id) == me:
            chosen.append(record)
    return chosen


@dataclass
class InheritedWarmup:
    """The warm-up loop of one replica (`run`, a task on its event loop)."""

    service: SessionService
    me: str  # this replica's id, as the ring and the KV reports name it
    running_replicas: Callable[[], frozenset[str]]  # the replicas the router's ring is built from (blocking call)
    ring: Callable[[frozenset[str]], Owner]  # the router's ring over a set of replicas
    limit: int  # engine.inherit_warm_sessions
    on_warm: Callable[[WarmResult], None]  # metrics
    poll_s: float = 2.0
    _seen: frozenset[str] = frozenset()
    _pending: list[SessionRecord] = field(default_factory=list)
    _done: set[str] = field(default_factory=set)

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # a controller or store hiccup: the next poll tries again
                log.exception("inherited-session warm-up poll failed")
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """One look at the ring, then warm what is pending while the engine stays idle."""
        running = await asyncio.to_thread(self.running_replicas)
        if running != self._seen and self.me in running:
            self._seen = running
            self._pending = await asyncio.to_thread(self._select, running)
            if self._pending:
                log.info(
                    "inherited sessions to warm",
                    extra={"replica": self.me, "sessions": ",".join(r.session_id for r in self._pending)},
                )
        while self._pending and self._engine_idle():
            record = self._pending[0]
            if await self._warm(record):
                self._pending.pop(0)
                self._done.add(record.session_id)

    def _select(self, running: frozenset[str]) -> list[SessionRecord]:
        store, owner = self.service.manager.store, self.ring(running)
        chosen: list[SessionRecord] = []
        for offset in range(0, SCAN_LIMIT, MAX_PAGE):
            page = store.recent(limit=MAX_PAGE, offset=offset)
            chosen += inherited(
                page, me=self.me, running=running, owner=owner, done=self._done, limit=self.limit - len(chosen)
            )
            if len(chosen) == self.limit or len(page) < MAX_PAGE:
                break
        return chosen

    async def _warm(self, record: SessionRecord) -> bool:
        """Warm one session; False when it yielded to another session's turn (it is tried again later)."""
        session_id = record.session_id
        current = await asyncio.to_thread(self.service.manager.store.get, session_id)
        if current is None or current.kv.replica in self._seen:  # deleted, or a turn ran on a live replica since
            return True
        if not self._room_for(record.kv.tokens):
            log.info("inherited session not warmed", extra={"session_id": session_id, "kv_tokens": record.kv.tokens})
            return True
        warming = asyncio.ensure_future(self.service.warm(session_id))
        try:
            while not warming.done():
                await asyncio.wait({warming}, timeout=YIELD_CHECK_S)
                if not warming.done() and self._turn_waiting(session_id):
                    warming.cancel()
                    await asyncio.wait({warming})
        finally:
            warming.cancel()  # the replica is stopping (this task was cancelled): stop the warm-up too
        try:
            result = warming.result()
        except asyncio.CancelledError:
            return self.service.manager.turns_in(session_id) > 0  # that session's own turn took over: done
        except SessionNotFound:
            return True  # deleted since the look at the store
        except Exception:  # best effort: a session that cannot be warmed is left to its next turn, not retried
            log.exception("inherited session warm-up failed", extra={"session_id": session_id})
            return True
        log.info(
            "inherited session warmed",
            extra={
                "session_id": session_id,
                "replica": self.me,
                "source": result.source,
                "tokens": result.tokens,
                "cached_tokens": result.cached_tokens,
                "ms": round(result.ms, 1),
            },
        )
        self.on_warm(result)
        return True

    def _engine_idle(self) -> bool:
        stats = self.service.engine.stats()
        return stats.get("running", 0) == 0 and stats.get("waiting", 0) == 0

    def _turn_waiting(self, session_id: str) -> bool:
        """Another request in the engine besides the warm-up, or a turn of this session queued behind it."""
        stats = self.service.engine.stats()
        return stats.get("running", 0) + stats.get("waiting", 0) > 1 or self.service.manager.turns_in(session_id) > 1

    def _room_for(self, tokens: int) -> bool:
        """Free device blocks for the session's KV (+ a block of slack), so warming it moves nobody else's KV."""
        stats = self.service.engine.stats()
        free = stats.get("device_blocks_total", 0) - stats.get("device_blocks_used", 0)
        block_size = stats.get("block_size", 0)
        return block_size > 0 and free >= math.ceil(tokens / block_size) + 1
