"""One generation request inside the engine: its tokens, how many have KV, its blocks and its status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.engine.types import FinishReason, KVPolicy, KVTier, SamplingParams, TurnTiming

if TYPE_CHECKING:
    import torch

    from serving.engine.detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"  # in the batch: prefilling in chunks or decoding
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_key: str | None = None  # session whose KV this request reuses and then extends
    kv_policy: KVPolicy = "pinned"  # what the session keeps of this request's KV when it ends
    arrival_s: float = 0.0  # when it was queued (time.monotonic): its queueing time and the aging bound count from here
    max_tokens: int = 0  # most tokens (prompt + reply) this request may reach; set by the engine
    all_token_ids: list[int] = field(default_factory=list)  # prompt followed by the reply so far
    num_computed_tokens: int = 0  # leading tokens of all_token_ids whose KV is in this request's blocks
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the session instead of being computed
    block_ids: list[int] = field(default_factory=list)  # device block table
    kv_source: KVTier = "none"  # the tier the reused prefix came from ("none": everything computed)
    kv_stale: bool = False  # KV was stored for this session but did not match the prompt: discarded, recomputed
    attached: bool = False  # the KV cache manager has taken over the session's KV for this request
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # per-request RNG for seeded sampling
    detokenizer: IncrementalDetokenizer | None = None
    timing: TurnTiming | None = None  # the caller's record of where the time went (engine phases added here)
    started: bool = False  # a step has run it (queueing time is counted once, not again after a preemption)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.all_token_ids) - self.num_computed_tokens
