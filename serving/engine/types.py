"""The engine's public contract: what callers submit and what streams back.

Everything above the engine (service, server, clients) depends only on these types and on the `Engine`
protocol, never on the engine's internals, so tests and other engines can stand in for `PagedEngine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]
KVTier = Literal["device", "host", "disk", "none"]
# What a session's KV is worth keeping: "pinned" (kept, moved to host then disk when idle and memory is short),
# "evictable" (kept only while nothing needs the room: dropped first, never moved), "none" (freed at turn end).
KVPolicy = Literal["pinned", "evictable", "none"]
KV_POLICIES: tuple[KVPolicy, ...] = ("pinned", "evictable", "none")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy (exactly argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the reply is cut before the first match
    ignore_eos: bool = False  # keep generating past EOS up to max_new_tokens (benchmarks: fixed reply lengths)


@dataclass(slots=True)
class TurnTiming:
    """Where one turn's time went, in seconds: one record per request, filled in place as the turn runs.

    The service fills the store, prompt and commit phases and the total; the engine fills the phases of its
    steps (from its own thread; the caller reads them only after the last chunk). A batched step counts in full
    for every request in it. `other_s` is what no phase covers: thread hand-offs, the event loop, bookkeeping.
    """

    store_read_s: float = 0.0  # session record and history from the store (with the turn lock and lease)
    prompt_s: float = 0.0  # prompt building: chat template, tokenization, context trimming
    queue_s: float = 0.0  # submitted -> start of the first engine step that runs it
    schedule_s: float = 0.0  # the scheduler's share of its steps (admission, blocks, KV moves)
    prepare_s: float = 0.0  # building the steps' input tensors and block tables
    forward_s: float = 0.0  # the model's forward passes
    sample_s: float = 0.0  # picking tokens from the logits
    detok_s: float = 0.0  # incremental detokenization and stop strings
    commit_s: float = 0.0  # storing the finished turn
    total_s: float = 0.0  # the whole turn, as its service call saw it

    @property
    def other_s(self) -> float:
        covered: float = sum(getattr(self, name) for name in _PHASES)
        return max(0.0, self.total_s - covered)

    def phases_ms(self) -> dict[str, float]:
        """Milliseconds by phase (`other` included, `total` last): what clients and benchmarks report."""
        values = {name.removesuffix("_s"): getattr(self, name) for name in _PHASES}
        values |= {"other": self.other_s, "total": self.total_s}
        return {name: round(seconds * 1000, 3) for name, seconds in values.items()}


_PHASES = (
    *("store_read_s", "prompt_s", "queue_s", "schedule_s", "prepare_s"),
    *("forward_s", "sample_s", "detok_s", "commit_s"),
)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: the full prompt's token ids and, for a session, the key whose KV it may reuse.

    `cache_key` names the KV the engine keeps after the request finishes (a session id), as `kv_policy` says;
    requests without one are stateless and their KV is freed at the end.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_key: str | None = None
    timing: TurnTiming | None = None  # the engine adds its phases here when given one
    kv_policy: KVPolicy = "pinned"


class EngineFailed(RuntimeError):
    """The engine's step loop failed or stopped: in-flight requests end with this, new ones are refused."""


@dataclass(slots=True)
class GenerationChunk:
    """A piece of a streamed reply, as each engine step produces it. The last chunk has `finish_reason` set."""

    request_id: str
    token_ids: list[int]  # tokens new in this chunk (a stop string's tokens are not withheld)
    text: str  # text new in this chunk, with stop strings already cut out
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # prompt length (set on every chunk)
    cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed
    kv_source: KVTier = "none"  # where the reused KV came from; prompt_tokens - cached_tokens were recomputed
    kv_stale: bool = False  # the session's stored KV did not match this prompt (hash chain): recomputed instead


@dataclass(frozen=True, slots=True)
class KVInfo:
    """Where a session's KV lives and how many tokens it covers."""

    tier: KVTier
    tokens: int


class Engine(Protocol):
    """Asynchronous submit / stream / cancel, plus lifecycle of per-session KV."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Submit a request and stream its reply. Closing the iterator early cancels the request."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Stop a running request; its stream ends with finish_reason 'cancelled'."""
        ...

    def release(self, cache_key: str) -> None:
        """Forget a session's KV (destroy, clear, or history edited)."""
        ...

    def kv_info(self, cache_key: str) -> KVInfo:
        """Tier and token count of a session's KV; tier 'none' when nothing is held."""
        ...

    def cache_keys(self) -> list[str]:
        """Every key KV is held under, in any tier (to free the KV of sessions another replica destroyed)."""
        ...

    def fork(self, source_key: str, target_key: str) -> None:
        """Make `target_key` share `source_key`'s KV (copy-on-write where supported)."""
        ...

    def stats(self) -> dict[str, float]:
        """Numbers for /metrics and benchmarks (flat name -> number); which names is up to the engine."""
        ...

    def health(self) -> str | None:
        """None while the engine can serve; otherwise why not (its step loop failed or stopped)."""
        ...

    @property
    def max_context_tokens(self) -> int:
        """Longest prompt + reply the model accepts."""
        ...

    async def shutdown(self) -> None:
        """Stop background work and free memory."""
        ...
