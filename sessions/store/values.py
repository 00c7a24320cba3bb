"""The small value types of the store protocol: the KV report a turn stores, UNCHANGED, and the parameter types
every backend repeats in its signatures."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Unchanged(enum.Enum):
    """The type of UNCHANGED: 'leave this field as it is', distinct from None ('clear it')."""

    UNCHANGED = "UNCHANGED"


UNCHANGED = Unchanged.UNCHANGED

# Parameter types every backend repeats in its signatures.
Holder = str | None  # the turn lease an edit acts under; None: the caller holds no lease
Prompt = str | Unchanged | None  # update: a new system prompt, UNCHANGED, or None to clear it
Metadata = dict[str, Any] | None  # update: new metadata (replaces it whole), or None to keep it
KV_TIERS = ("device", "host", "disk", "none")


@dataclass(frozen=True, slots=True)
class KVReport:
    """A session's KV cache as last reported by the replica holding it (stored with the turn it committed).

    `tier`: "device" (accelerator memory), "host" (offloaded to host memory), "disk" (a file in the kv dir) or
    "none" (not held); `tokens`: how many tokens it covers; `replica`: the id of the replica holding it, "" if
    unknown. KVReport() means nothing reported.
    """

    tier: str = "none"
    tokens: int = 0
    replica: str = ""

    def __post_init__(self) -> None:
        if self.tier not in KV_TIERS:
            raise ValueError(f"a KV report's tier must be one of {', '.join(KV_TIERS)}, got {self.tier!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"a KV report's tokens must be a whole number >= 0, got {self.tokens!r}")
        if not isinstance(self.replica, str):
            raise ValueError(f"a KV report's replica must be a string, got {self.replica!r}")


KVUpdate = KVReport | None  # a KV report to store with a write; None: keep the record's
