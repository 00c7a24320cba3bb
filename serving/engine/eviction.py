"""The one eviction order: which idle session KV gives up its room first, and what becomes of it (plain Python).

When the device pool is short, idle sessions' KV is reclaimed in this order, least recently used first within
each step:
1. `evictable` sessions: dropped (never moved: their owners chose recomputing over keeping);
2. `pinned` sessions whose grace period is over: moved to the host tier;
3. `pinned` sessions still in their grace period (their turn ended less than `kv_grace_s` ago, so their next turn
   is likely on its way): moved to the host tier too, but only for a caller allowed to take them (a running
   request that must grow, a request that waited past the scheduler's aging bound, or an otherwise idle engine).
When the host tier is short, its least recently used sessions leave it (`host_victim`): to the disk tier when one is
configured (`KVCacheManager._evict`), dropped otherwise. Sessions with policy `none` never hold idle KV, so they
never appear here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from serving.engine.kv_cache_manager import SessionKV

Action = Literal["drop", "offload"]


@dataclass(frozen=True, slots=True)
class Eviction:
    session: SessionKV
    action: Action  # "drop": its KV is freed; "offload": it moves to the next tier


def device_victim(idle: Iterable[SessionKV], now: float, grace_s: float, take_grace: bool) -> Eviction | None:
    """The next idle device session to reclaim, from `idle` in LRU order (least recently used first)."""
    past_grace: SessionKV | None = None
    in_grace: SessionKV | None = None
    for session in idle:
        if session.policy == "evictable":
            return Eviction(session, "drop")
        if now - session.idle_since >= grace_s:
            past_grace = past_grace or session
        else:
            in_grace = in_grace or session
    if past_grace is not None:
        return Eviction(past_grace, "offload")
    if in_grace is not None and take_grace:
        return Eviction(in_grace, "offload")
    return None


def host_victim(idle: Iterable[SessionKV]) -> SessionKV | None:
    """The next idle host session to leave host memory (for disk, or dropped): the least recently used."""
    return next(iter(idle), None)
