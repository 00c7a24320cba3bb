"""Per-session token accounting: how many prompt tokens a turn recomputed, and why (pure Python).

The engine reports only a turn's prompt and cached token counts. Whether computed tokens were *re*computed, and
why, is known here: the session's KV report (stored with its last committed turn) says how many tokens that turn
left in context and which replica held its KV.
- `first_turn`: no turn was committed since the session's history began (creation, clear, new system prompt), so
  no KV could exist: every computed prompt token counts;
- `failover`: the last turn ran on another replica (a replica loss, a restart, a new ring owner);
- `stale`: the engine found KV for the session but it did not match the prompt (a hash mismatch it reports);
- `dropped`: this replica had the KV and let it go (tier pressure, or the session's evictable / none policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sessions.store.values import KVReport, TokenUsage

RecomputeReason = Literal["first_turn", "dropped", "failover", "stale"]
RECOMPUTE_REASONS: tuple[RecomputeReason, ...] = ("first_turn", "dropped", "failover", "stale")


@dataclass(frozen=True, slots=True)
class TurnAccount:
    usage: TokenUsage  # the session's cumulative usage including this turn
    recomputed_tokens: int
    reason: RecomputeReason | None  # None when nothing was recomputed


def account_turn(
    before: KVReport,
    replica: str,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    stale: bool = False,
) -> TurnAccount:
    """This turn's recomputed tokens and their reason, and the session's usage with the turn added.

    `before` is the session's KV report as the turn found it; `replica` the id of the replica running the turn.
    A later turn's prompt starts with the last turn's prompt + reply, of which all but the reply's last token
    could have had KV: anything of that the engine did not find cached was recomputed.
    """
    last = before.usage
    if last.context == 0:
        reason: RecomputeReason = "first_turn"
        recomputed = prompt_tokens - cached_tokens
    else:
        expected = min(last.context - 1, prompt_tokens - 1)
        recomputed = max(0, expected - cached_tokens)
        reason = "stale" if stale else "failover" if before.replica != replica else "dropped"
    usage = TokenUsage(
        prompt=last.prompt + prompt_tokens,
        cached=last.cached + cached_tokens,
        recomputed=last.recomputed + recomputed,
        completion=last.completion + completion_tokens,
        context=prompt_tokens + completion_tokens,
    )
    return TurnAccount(usage, recomputed, reason if recomputed else None)
