"""Who holds which KV blocks, per request and per session, and in which tier (plain Python, no torch).

- A request's block table covers its computed tokens; blocks are added as the scheduler gives it tokens.
- A session (cache_key) keeps the blocks of its last turn as its KV policy says (the turn's request carries it):
  `pinned` KV is never discarded by other traffic, only moved to the host tier when the device runs short and,
  past the host budget, to the disk tier (`DiskTier`, when configured; dropped otherwise, and the next turn
  recomputes from the prompt); `evictable` KV is dropped as soon as anyone needs the room; `none` is freed when the
  turn ends. Which idle KV goes first is `eviction.py`'s one order; a pinned session whose turn just ended keeps its
  device blocks for a grace period unless a caller may take them. A turn whose session holds nothing in memory asks
  the disk tier, which answers only with KV whose hash chain matches the turn's prompt (after a restart, or from
  another replica).
- A turn borrows its session's KV: the longest common prefix of the prompt with the session's tokens is reused
  (whole blocks, plus the partial last block, copied first if a fork shares it); the rest is freed. When the turn
  ends, its blocks become the session's KV.
- A fork shares its parent's blocks (reference counts); whoever writes into a shared partial block copies it.
- In a model whose every layer is sliding (`window`), blocks wholly before the window of a request's next token
  are freed as it advances (the entry becomes `DROPPED`), so a sequence holds about `window` tokens of KV at any
  context. A later turn reuses such a session's KV only if the prompt keeps every token whose KV it still needs;
  otherwise it recomputes from the start (KV at a position depends on the window before it, layer upon layer).

Tensor copies (device<->host, copy-on-write) are asked of the model runner through `BlockCopier`, at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from serving.engine import eviction
from serving.engine.block_pool import DROPPED, BlockPool
from serving.engine.request import Request
from serving.engine.token_ids import common_prefix_length
from serving.engine.types import KVPolicy, KVTier

BlockPairs = list[tuple[int, int]]


class BlockCopier(Protocol):
    def swap_out(self, pairs: BlockPairs) -> None:
        """Copy device blocks to host blocks: [(device_id, host_id), ...]."""

    def swap_in(self, pairs: BlockPairs) -> None:
        """Copy host blocks to device blocks: [(host_id, device_id), ...]."""

    def copy(self, pairs: BlockPairs) -> None:
        """Copy device blocks to device blocks: [(src_id, dst_id), ...]."""


class StoredKV(Protocol):
    """KV found on disk for a prompt: its first `tokens` tokens, ready to be copied into device blocks."""

    @property
    def tokens(self) -> int: ...

    def restore(self, device_block_ids: list[int]) -> None: ...


class DiskTier(Protocol):
    """The last tier (serving/engine/disk_kv.py): written in the background, bound to the tokens it encodes."""

    def save(self, key: str, token_ids: list[int], tier: KVTier, block_ids: list[int]) -> None:
        """Take a copy of the blocks now (the caller frees them right after) and store it."""

    def load(self, key: str, prompt: Sequence[int], max_tokens: int) -> StoredKV | None:
        """The stored KV of `key` that matches `prompt`'s leading tokens (at most max_tokens); None if nothing is
        stored; a hit of 0 tokens if what is stored does not match (stale, foreign or unreadable)."""

    def discard(self, key: str) -> None: ...

    def has(self, key: str) -> bool: ...


@dataclass(eq=False, slots=True)
class SessionKV:
    key: str
    policy: KVPolicy = "pinned"  # that of its last turn
    tier: KVTier = "none"
    token_ids: list[int] = field(default_factory=list)  # tokens whose KV the blocks hold
    block_ids: list[int] = field(default_factory=list)  # ids in the pool of `tier`
    request: Request | None = None  # the turn currently extending this session (it holds the blocks meanwhile)
    idle_since: float = 0.0  # when its last turn ended (clock of the manager): the grace period counts from here


class KVCacheManager:
    def __init__(
        self,
        num_device_blocks: int,
        num_host_blocks: int,
        block_size: int,
        copier: BlockCopier,
        disk: DiskTier | None = None,
        window: int | None = None,
        grace_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.window = window  # every layer sliding: the most tokens back any layer reads (None: keep everything)
        self.grace_s = grace_s
        self.clock = clock
        self.pools = {"device": BlockPool(num_device_blocks), "host": BlockPool(num_host_blocks)}
        self.device = self.pools["device"]
        self.host = self.pools["host"]
        self.copier = copier
        self.disk = disk
        self.sessions: dict[str, SessionKV] = {}
        self._idle: dict[str, OrderedDict[str, None]] = {"device": OrderedDict(), "host": OrderedDict()}  # LRU first
        self.counters = {"offloaded_sessions": 0, "restored_sessions": 0, "dropped_sessions": 0, "cow_copies": 0}
        self.counters |= {"spilled_sessions": 0, "disk_restored_sessions": 0}
        self.counters["evicted_sessions"] = 0  # evictable sessions' KV dropped for room

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------ sessions

    def session_info(self, key: str) -> tuple[KVTier, int]:
        session = self.sessions.get(key)
        if session is None:
            return "none", 0
        if session.request is not None:  # mid-turn: the KV lives in the request's blocks
            computed = session.request.num_computed_tokens
            return ("device", computed) if computed else ("none", 0)
        return session.tier, len(session.token_ids)

    def is_resident(self, request: Request) -> bool:
        """Whether the request's session KV waits idle on the device (its turn needs no swap-in nor recompute)."""
        session = self.sessions.get(request.cache_key) if request.cache_key is not None else None
        return session is not None and session.request is None and session.tier == "device"

    def release(self, key: str) -> None:
        """Forget a session, on disk too. A turn in flight keeps its blocks until it ends, then frees them."""
        session = self.sessions.pop(key, None)
        if session is not None and session.request is None:
            self._forget_kv(session)
        if self.disk is not None:
            self.disk.discard(key)

    def persist(self) -> None:
        """Move every idle session's KV (device and host) to the disk tier: the last thing before a shutdown."""
        for tier in ("device", "host"):
            for key in list(self._idle[tier]):
                self._evict(self.sessions[key])

    def fork(self, source_key: str, target_key: str) -> None:
        """`target_key` shares `source_key`'s idle KV (same tier); nothing to share leaves it empty."""
        if source_key == target_key:
            return
        self.release(target_key)
        target = self.sessions[target_key] = SessionKV(target_key)
        source = self.sessions.get(source_key)
        if source is None or source.request is not None or source.tier not in self._idle:
            return
        self.pools[source.tier].share(source.block_ids)
        target.tier, target.token_ids, target.block_ids = source.tier, list(source.token_ids), list(source.block_ids)
        target.policy, target.idle_since = source.policy, source.idle_since
        self._idle[target.tier][target_key] = None

    # ------------------------------------------------------------------------------------------ requests

    def attach(self, request: Request, take_grace: bool = True) -> bool:
        """Before a request first runs: take over its session's KV for the reused prefix. False if no room.

        `take_grace`: whether room may come from pinned sessions still in their grace period (eviction.py)."""
        if request.attached:
            return True
        session = self._claim_session(request)
        blocks: list[int] = []
        reuse = 0
        if session is not None and session.tier not in self._idle:  # nothing in memory: maybe on disk
            hit = self.disk.load(session.key, request.all_token_ids, request.num_tokens - 1) if self.disk else None
            request.kv_stale = hit is not None and not hit.tokens
            if hit is not None and hit.tokens:
                if not self._make_room(self.blocks_for(hit.tokens), take_grace):
                    session.request = None
                    return False
                blocks = self.device.allocate(self.blocks_for(hit.tokens))
                hit.restore(blocks)
                reuse = hit.tokens
                request.kv_source = "disk"
                self.counters["disk_restored_sessions"] += 1
            session.tier, session.token_ids = "none", []
        elif session is not None:
            reuse = min(common_prefix_length(session.token_ids, request.all_token_ids), request.num_tokens - 1)
            if reuse and session.block_ids[self._first_needed_block(reuse)] == DROPPED:
                reuse = 0  # the KV the first new token needs was dropped: recompute everything
            request.kv_source = session.tier if reuse else "none"
            keep = self.blocks_for(reuse)
            pool = self.pools[session.tier]
            cow = (
                session.tier == "device" and reuse % self.block_size and pool.ref_count(session.block_ids[keep - 1]) > 1
            )
            if not self._make_room(
                _held(session.block_ids[:keep]) if session.tier == "host" else int(bool(cow)), take_grace
            ):
                session.request = None
                self._idle[session.tier][session.key] = None
                return False
            pool.free(session.block_ids[keep:])
            blocks = session.block_ids[:keep]
            if session.tier == "host" and keep:
                on_device, pairs = self._moved(blocks, self.device)
                self.copier.swap_in(pairs)
                self.host.free(blocks)
                blocks = on_device
                self.counters["restored_sessions"] += 1
            elif cow:
                (copy,) = self.device.allocate(1)
                self.copier.copy([(blocks[-1], copy)])
                self.device.free([blocks[-1]])
                blocks[-1] = copy
                self.counters["cow_copies"] += 1
            session.tier, session.token_ids, session.block_ids = "none", [], []
        request.block_ids = blocks
        request.num_computed_tokens = request.num_cached_tokens = reuse
        request.attached = True
        return True

    def allocate_slots(self, request: Request, num_new_tokens: int, take_grace: bool = True) -> bool:
        """Make the block table cover `num_new_tokens` more tokens, reclaiming idle sessions' KV if needed (and, in
        an all-sliding model, first free the blocks no layer will read again)."""
        self._drop_outside_window(request)
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        if need <= 0:
            return True
        if not self._make_room(need, take_grace):
            return False
        request.block_ids.extend(self.device.allocate(need))
        return True

    def preempt(self, request: Request) -> None:
        """Free all of a running request's blocks; it will recompute every token when it runs again."""
        self.device.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        if not request.num_output_tokens:  # nothing streamed yet: report the recompute honestly
            request.num_cached_tokens = 0

    def finish(self, request: Request) -> None:
        """A request ended (any reason): its computed KV becomes its session's, or is freed."""
        computed = request.num_computed_tokens
        keep = self.blocks_for(computed)
        self.device.free(request.block_ids[keep:])
        session = self.sessions.get(request.cache_key) if request.cache_key is not None else None
        if session is not None and session.request is request:
            session.request = None
            if computed and request.kv_policy != "none":
                session.tier, session.block_ids = "device", request.block_ids[:keep]
                session.token_ids = request.all_token_ids[:computed]
                session.idle_since = self.clock()
                self._idle["device"][session.key] = None
            else:
                self.device.free(request.block_ids[:keep])
        else:
            self.device.free(request.block_ids[:keep])
        request.block_ids = []
        request.attached = False

    # ------------------------------------------------------------------------------------------ internals

    def _claim_session(self, request: Request) -> SessionKV | None:
        """The request's session, now marked busy; None for stateless requests or a session busy elsewhere."""
        if request.cache_key is None:
            return None
        session = self.sessions.setdefault(request.cache_key, SessionKV(request.cache_key))
        if session.request is not None:
            return None  # a concurrent turn of the same session: run without reuse, keep nothing
        session.request = request
        session.policy = request.kv_policy
        if session.tier in self._idle:
            del self._idle[session.tier][session.key]
        return session

    def _first_needed_block(self, position: int) -> int:
        """The earliest block whose KV the token at `position` (> 0) needs: its window's start, or the block
        holding `position - 1` (new tokens are written after it)."""
        first_key = max(0, position - self.window + 1) if self.window is not None else 0
        return min(first_key, position - 1) // self.block_size

    def _drop_outside_window(self, request: Request) -> None:
        """Free the blocks before the window of the request's next token; dropped entries form a prefix, so walk
        back from the newest candidate until one is already dropped."""
        if self.window is None or not request.num_computed_tokens:
            return
        table = request.block_ids
        index = min(self._first_needed_block(request.num_computed_tokens), len(table)) - 1
        while index >= 0 and table[index] != DROPPED:
            self.device.free([table[index]])
            table[index] = DROPPED
            index -= 1

    def _moved(self, blocks: list[int], pool: BlockPool) -> tuple[list[int], BlockPairs]:
        """`blocks` on newly allocated blocks of `pool` (dropped entries stay dropped), and the copies to make."""
        fresh = iter(pool.allocate(_held(blocks)))
        table = [DROPPED if block == DROPPED else next(fresh) for block in blocks]
        return table, [(old, new) for old, new in zip(blocks, table, strict=True) if old != DROPPED]

    def _make_room(self, num_blocks: int, take_grace: bool) -> bool:
        """Free device blocks by reclaiming idle sessions' KV in the one eviction order (eviction.py)."""
        now = self.clock()
        while self.device.num_free < num_blocks:
            idle = (self.sessions[key] for key in self._idle["device"])
            victim = eviction.device_victim(idle, now, self.grace_s, take_grace)
            if victim is None:
                return False
            if victim.action == "drop":
                self._forget_kv(victim.session)
                self.counters["evicted_sessions"] += 1
            else:
                self._offload(victim.session)
        return True

    def _offload(self, session: SessionKV) -> None:
        n = _held(session.block_ids)
        while self.host.num_free < n:
            victim = eviction.host_victim(self.sessions[key] for key in self._idle["host"])
            if victim is None:
                break
            self._evict(victim)  # to the disk tier when there is one
        if self.host.num_free < n:  # bigger than the whole host tier
            self._evict(session)
            return
        del self._idle["device"][session.key]
        on_host, pairs = self._moved(session.block_ids, self.host)
        self.copier.swap_out(pairs)
        self.device.free(session.block_ids)
        session.tier, session.block_ids = "host", on_host
        self._idle["host"][session.key] = None
        self.counters["offloaded_sessions"] += 1

    def _evict(self, session: SessionKV) -> None:
        """An idle session leaves memory: to the disk tier if there is one, else dropped (its next turn recomputes)."""
        token_ids = session.token_ids
        # A file holds a prefix of whole blocks from the first: a table with blocks freed behind a sliding window
        # (every layer sliding) has none to give, so such a session is dropped instead.
        if self.disk is not None and DROPPED not in session.block_ids:
            self.disk.save(session.key, token_ids, session.tier, session.block_ids)
        self._forget_kv(session)
        if self.disk is not None and self.disk.has(session.key):
            session.tier, session.token_ids = "disk", token_ids
            self.counters["spilled_sessions"] += 1
        else:
            self.counters["dropped_sessions"] += 1

    def _forget_kv(self, session: SessionKV) -> None:
        """Drop an idle session's KV from whichever memory tier holds it (not its file: see `release`)."""
        if session.tier in self._idle:
            self.pools[session.tier].free(session.block_ids)
            self._idle[session.tier].pop(session.key, None)
        session.tier, session.token_ids, session.block_ids = "none", [], []


def _held(blocks: list[int]) -> int:
    """How many blocks a block table holds (dropped entries hold none)."""
    return sum(block != DROPPED for block in blocks)
