"""The small value types of the store protocol: the KV report a turn stores, UNCHANGED, a lease, a held history
prefix, and the parameter types every backend repeats in its signatures."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Unchanged(enum.Enum):
    """The type of UNCHANGED: 'leave this field as it is', distinct from None ('clear it')."""

    UNCHANGED = "UNCHANGED"


UNCHANGED = Unchanged.UNCHANGED

# Parameter types every backend repeats in its signatures.
Holder = str | None  # the turn lease an edit acts under; None: the caller holds no lease
Owner = str | None  # the caller a session must belong to (base.owned_by); None: any caller
Prompt = str | Unchanged | None  # update: a new system prompt, UNCHANGED, or None to clear it
Metadata = dict[str, Any] | None  # update: new metadata (replaces it whole), or None to keep it
KV_TIERS = ("device", "host", "disk", "none")


class Lease(NamedTuple):
    """A turn lease to take (or renew) with a load: who holds it, and for how long."""

    holder: str
    ttl_s: float


class HistoryPrefix(NamedTuple):
    """The first `length` messages of the history named `history_id` (SessionRecord.history_id), which a caller
    already holds: a turn's load then reads only the messages after them."""

    history_id: str
    length: int


def new_history_id() -> str:
    """A fresh name for a session's history: stores give one at create and at every clear."""
    return uuid.uuid4().hex


KV_POLICIES = ("pinned", "evictable", "none")  # what a session's KV is worth keeping (see SessionRecord.kv_policy)
_USAGE_FIELDS = ("prompt", "cached", "recomputed", "completion", "context")


def _check_count(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """A session's token accounting, summed over the turns committed since its history was last reset.

    `prompt`, `cached` (prompt tokens whose KV was reused), `recomputed` (prompt tokens computed again although an
    earlier turn had computed them, or all of a first turn's), `completion`; `context`: prompt + reply tokens of the
    last committed turn (what a kept KV covers, so the next turn knows how much it should have found).
    """

    prompt: int = 0
    cached: int = 0
    recomputed: int = 0
    completion: int = 0
    context: int = 0

    def __post_init__(self) -> None:
        for name in _USAGE_FIELDS:
            _check_count(f"token usage's {name}", getattr(self, name))

    def to_json(self) -> str:
        """How the stores keep it: one JSON object (absent keys read as 0)."""
        return json.dumps({name: getattr(self, name) for name in _USAGE_FIELDS}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict[str, Any] | None) -> TokenUsage:
        data = json.loads(text) if isinstance(text, str) else (text or {})
        return cls(**{name: int(data.get(name, 0)) for name in _USAGE_FIELDS})


@dataclass(frozen=True, slots=True)
class KVReport:
    """A session's KV cache as last reported by the replica holding it (stored with the turn it committed).

    `tier`: "device" (accelerator memory), "host" (offloaded to host memory), "disk" (a file in the kv dir) or
    "none" (not held); `tokens`: how many tokens it covers; `replica`: the id of the replica holding it, "" if
    unknown; `usage`: the session's cumulative token accounting. KVReport() means nothing reported; history edits
    that reset the report reset `usage` too.
    """

    tier: str = "none"
    tokens: int = 0
    replica: str = ""
    usage: TokenUsage = field(default_factory=TokenUsage)

    def __post_init__(self) -> None:
        if self.tier not in KV_TIERS:
            raise ValueError(f"a KV report's tier must be one of {', '.join(KV_TIERS)}, got {self.tier!r}")
        _check_count("a KV report's tokens", self.tokens)
        if not isinstance(self.replica, str):
            raise ValueError(f"a KV report's replica must be a string, got {self.replica!r}")
        if not isinstance(self.usage, TokenUsage):
            raise ValueError(f"a KV report's usage must be a TokenUsage, got {self.usage!r}")


KVUpdate = KVReport | None  # a KV report to store with a write; None: keep the record's
