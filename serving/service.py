"""SessionService: sessions (history, prompt) + the engine (KV, generation), one turn at a time per session.

This is the layer both the Ray model deployment and the in-process LocalClient call (through
`server/api.py`); it knows nothing about HTTP or Ray. A turn's messages are committed only when its
generation finishes, so a failed or cancelled turn leaves the stored history untouched. Store calls inside
a turn go through `manager.store_call`: a slow or unreachable store must never stall the event loop streaming tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Literal, Protocol, cast

from serving.engine.token_ids import common_prefix_length
from serving.engine.types import (
    Engine,
    FinishReason,
    GenerationRequest,
    KVInfo,
    KVPolicy,
    KVTier,
    SamplingParams,
    TurnTiming,
)
from sessions.accounting import RecomputeReason, account_turn
from sessions.errors import InvalidRequest, StoreUnavailable
from sessions.manager import SessionManager, Turn
from sessions.messages import Message
from sessions.prompt import PromptBuilder
from sessions.store.base import KVReport, SessionRecord, TokenUsage


@dataclass(frozen=True, slots=True)
class TurnLimits:
    """Per-request caps an operator sets (serving.max_new_tokens / max_prompt_tokens)."""

    max_new_tokens: int = 4096
    max_prompt_tokens: int = 0  # 0 = whatever fits the context

    def budget(self, params: SamplingParams, context: int) -> int:
        """Tokens prompt + reply may use; raises if the request asks for more new tokens than allowed."""
        if params.max_new_tokens > self.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens (max_tokens on /v1/chat/completions) {params.max_new_tokens} is over this"
                f" server's limit of {self.max_new_tokens}"
            )
        if self.max_prompt_tokens:
            return min(context, self.max_prompt_tokens + params.max_new_tokens)
        return context


@dataclass(frozen=True, slots=True)
class TurnResult:
    session_id: str
    response: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_ms: float
    total_ms: float  # generation: submitted -> last chunk
    timing: TurnTiming  # the whole turn by phase (store, prompt, engine steps, commit)
    kv_stale: bool = False  # the engine found stored KV for the session that did not match the prompt
    kv_source: KVTier = "none"  # the tier the reused KV came from ("none": nothing reused)
    recomputed_tokens: int = 0  # prompt tokens an earlier turn had computed, computed again (sessions only)
    recompute_reason: RecomputeReason | None = None  # why (sessions.accounting), None when nothing was


WarmSource = Literal["device", "host", "disk", "recomputed"]


@dataclass(frozen=True, slots=True)
class WarmResult:
    """A session's KV brought to the device ahead of its next turn: from where, how much, how long it took."""

    session_id: str
    source: WarmSource  # the tier the reused KV came from; "recomputed" when none was reused
    tokens: int  # tokens of the session's history whose KV is on the device now
    cached_tokens: int  # of those, how many were reused rather than recomputed
    ms: float


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of a streamed reply."""

    text: str


@dataclass(frozen=True, slots=True)
class SessionDetails:
    record: SessionRecord
    messages: int
    turns: int
    context_tokens: int
    kv: KVInfo


class KVLookup(Protocol):
    def kv_info(self, cache_key: str) -> KVInfo: ...


class SessionCatalog:
    """How a session looks from outside: record, message and turn counts, context tokens, where its KV lives.

    A model replica knows the KV live (its engine is the `kv` lookup). The ingress serves history-only operations
    straight from the store and has no engine: it shows the KV as the replica holding it last reported it (written
    on the record with every committed turn).
    """

    def __init__(
        self, manager: SessionManager, prompts: PromptBuilder, kv: KVLookup | None, max_context_tokens: int
    ) -> None:
        self.manager = manager
        self.prompts = prompts
        self.kv = kv
        self.max_context_tokens = max_context_tokens

    def details(self, session_id: str, owner: str | None = None) -> SessionDetails:
        return self.describe(*self.manager.load(session_id, owner))

    def describe(self, record: SessionRecord, history: list[Message]) -> SessionDetails:
        session_id = record.session_id
        kv = self.kv.kv_info(session_id) if self.kv is not None else KVInfo(record.kv.tier, record.kv.tokens)
        context = kv.tokens if kv.tokens else self._context_tokens(record, history)
        turns = sum(1 for message in history if message.role == "assistant")
        return SessionDetails(record=record, messages=len(history), turns=turns, context_tokens=context, kv=kv)

    def _context_tokens(self, record: SessionRecord, history: list[Message]) -> int:
        """Tokens the session's next prompt starts from (its rendered history)."""
        built = self.prompts.build(
            record.system_prompt, history, [], max_new_tokens=0, max_context_tokens=self.max_context_tokens
        )
        return len(built.token_ids)


class SessionService:
    """Turns (session and stateless) and fork; history-only operations are `manager`'s, details `catalog`'s."""

    def __init__(
        self,
        manager: SessionManager,
        prompts: PromptBuilder,
        engine: Engine,
        limits: TurnLimits | None = None,
        commit_timeout_s: float = 10.0,
        replica: str = "",
    ) -> None:
        self.manager = manager
        self.prompts = prompts
        self.engine = engine
        self.max_context_tokens = engine.max_context_tokens  # engine.max_model_len is applied there, once
        self.limits = limits or TurnLimits()
        self.commit_timeout_s = commit_timeout_s
        self.replica = replica  # named in the KV report each committed turn writes to the store
        self.catalog = SessionCatalog(manager, prompts, engine, self.max_context_tokens)
        self.on_turn: Callable[[TurnResult], None] | None = None  # metrics hook, called after every generation

    def fork(self, session_id: str, new_session_id: str | None = None, owner: str | None = None) -> SessionRecord:
        """A new session with the parent's history, sharing its KV (copy-on-write where the engine can)."""
        parent, history = self.manager.load(session_id, owner)
        child = self.manager.create(
            new_session_id or uuid.uuid4().hex,
            system_prompt=parent.system_prompt,
            messages=history,
            metadata=dict(parent.metadata),
            owner=owner,
            kv_policy=parent.kv_policy,
        )
        self.engine.fork(session_id, child.session_id)
        return child

    # ---- turns -----------------------------------------------------------------------------------
    async def turn(
        self,
        session_id: str,
        new_messages: Sequence[Message],
        params: SamplingParams,
        owner: str | None = None,
        check: Callable[[], object] | None = None,
    ) -> AsyncIterator[TextDelta | TurnResult]:
        """Generate after `new_messages`: text deltas, then one TurnResult. The messages and the reply are
        committed only if generation finished (stop or length).

        `check` runs first, before the turn waits for the session (OpenAI's get-or-create). The turn's store calls
        are two (manager.turn, manager.commit): each call costs a turn's first token or its end."""
        _require_user_last(new_messages)
        started, timing = time.perf_counter(), TurnTiming()
        if check is not None:
            await self.manager.store_call(check)
        async with self.manager.turn(session_id, owner) as turn:
            record, history = turn.record, turn.history
            built_at = time.perf_counter()
            timing.store_read_s = built_at - started  # with the turn lock and lease (no wait between own turns)
            built = self.prompts.build(
                record.system_prompt,
                history,
                new_messages,
                max_new_tokens=params.max_new_tokens,
                max_context_tokens=self.limits.budget(params, self.max_context_tokens),
            )
            timing.prompt_s = time.perf_counter() - built_at
            policy = cast(KVPolicy, record.kv_policy)
            async for event in self._generate(session_id, built.token_ids, params, session_id, timing, policy):
                if isinstance(event, TurnResult):
                    account = account_turn(
                        record.kv,
                        self.replica,
                        event.prompt_tokens,
                        event.cached_tokens,
                        event.completion_tokens,
                        stale=event.kv_stale,
                    )
                    event = replace(event, recomputed_tokens=account.recomputed_tokens, recompute_reason=account.reason)
                    if event.finish_reason != "cancelled":
                        committing, reply = time.perf_counter(), Message(role="assistant", content=event.response)
                        await self._commit(turn, [*new_messages, reply], account.usage)
                        timing.commit_s = time.perf_counter() - committing
                    timing.total_s = time.perf_counter() - started
                    self._finished(event)
                yield event

    async def warm(self, session_id: str, owner: str | None = None) -> WarmResult:
        """Bring the session's KV to the device (from host or disk, or by prefilling its history) without a turn.

        What is warmed is the prefix every next turn's prompt shares (history + the markup opening a user message:
        the common prefix of two renderings with different user texts), run for one token that is thrown away: the
        engine's one path (reuse the matching prefix, compute the rest) leaves exactly that prefix's KV pinned.
        """
        start = time.perf_counter()
        async with self.manager.turn(session_id, owner) as turn:
            record, history = turn.record, turn.history
            a, b = (
                self.prompts.build(
                    record.system_prompt,
                    history,
                    [Message(role="user", content=text)],
                    max_new_tokens=1,
                    max_context_tokens=self.max_context_tokens,
                ).token_ids
                for text in ("a", "b")
            )
            prefix = a[: common_prefix_length(a, b)]
            cached = 0
            source_tier: KVTier = "none"
            if prefix:
                request = GenerationRequest(
                    uuid.uuid4().hex,
                    prefix,
                    SamplingParams(max_new_tokens=1),
                    cache_key=session_id,
                    kv_policy=cast(KVPolicy, record.kv_policy),  # "none": nothing is kept, as for a turn
                )
                async with aclosing(self.engine.generate(request)) as chunks:
                    async for chunk in chunks:
                        cached, source_tier = chunk.cached_tokens, chunk.kv_source
        return WarmResult(
            session_id=session_id,
            source="recomputed" if source_tier == "none" else source_tier,
            tokens=len(prefix),
            cached_tokens=cached,
            ms=(time.perf_counter() - start) * 1000,
        )

    async def _commit(self, turn: Turn, messages: list[Message], usage: TokenUsage) -> None:
        """Store a finished turn (one atomic append, the lease given back with it). While the store is unreachable,
        retry until commit_timeout_s, then fail cleanly: the client gets store_unavailable and the turn is not
        stored."""
        session_id = turn.record.session_id
        kv = self.engine.kv_info(session_id)
        report = KVReport(tier=kv.tier, tokens=kv.tokens, replica=self.replica, usage=usage)
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self.commit_timeout_s, 0.05
        while True:
            try:
                await self.manager.commit(turn, messages[:-1], messages[-1], kv=report)
                return
            except StoreUnavailable:
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)
            with contextlib.suppress(StoreUnavailable):  # the failed attempt may have committed, its answer lost
                if await self.manager.store_call(self.manager.history, session_id, len(messages)) == messages:
                    return

    async def stateless(
        self, system_prompt: str | None, messages: Sequence[Message], params: SamplingParams
    ) -> AsyncIterator[TextDelta | TurnResult]:
        """A whole conversation sent by the client (OpenAI style): nothing stored, no KV kept."""
        _require_user_last(messages)
        started, timing = time.perf_counter(), TurnTiming()
        built = self.prompts.build(
            system_prompt,
            messages[:-1],
            messages[-1:],
            max_new_tokens=params.max_new_tokens,
            max_context_tokens=self.limits.budget(params, self.max_context_tokens),
        )
        timing.prompt_s = time.perf_counter() - started
        async for event in self._generate("", built.token_ids, params, None, timing):
            if isinstance(event, TurnResult):
                timing.total_s = time.perf_counter() - started
                self._finished(event)
            yield event

    def _finished(self, result: TurnResult) -> None:
        if self.on_turn is not None:
            self.on_turn(result)

    async def _generate(
        self,
        session_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_key: str | None,
        timing: TurnTiming,
        kv_policy: KVPolicy = "pinned",
    ) -> AsyncIterator[TextDelta | TurnResult]:
        request = GenerationRequest(uuid.uuid4().hex, prompt_ids, params, cache_key, timing=timing, kv_policy=kv_policy)
        start = time.perf_counter()
        first_token_at: float | None = None
        pieces: list[str] = []
        completion_tokens = cached_tokens = 0
        stale = False
        source: KVTier = "none"
        finish_reason: FinishReason = "cancelled"
        async with aclosing(self.engine.generate(request)) as chunks:
            async for chunk in chunks:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                completion_tokens += len(chunk.token_ids)
                cached_tokens, stale, source = chunk.cached_tokens, chunk.kv_stale, chunk.kv_source
                if chunk.text:
                    pieces.append(chunk.text)
                    yield TextDelta(chunk.text)
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
        end = time.perf_counter()
        yield TurnResult(
            session_id=session_id,
            response="".join(pieces),
            finish_reason=finish_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            ttft_ms=((first_token_at or end) - start) * 1000,
            total_ms=(end - start) * 1000,
            timing=timing,
            kv_stale=stale,
            kv_source=source,
        )

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def _require_user_last(messages: Sequence[Message]) -> None:
    if not messages or messages[-1].role != "user":
        raise InvalidRequest("the new messages must end with a user message for the model to answer")
