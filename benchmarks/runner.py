"""Drive one system through the workload: concurrent sessions, strictly ordered turns, client-side timing.

Every turn's prompt is the system's own history (the workload's messages plus the replies *this* system
generated) rendered by the shared PromptRenderer. TTFT = submit -> first streamed token, measured here
the same way for every system; TPOT = (last token - first token) / (tokens - 1) per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass

from benchmarks.chat import PromptRenderer
from benchmarks.systems import System
from benchmarks.workload import Message, SessionScript, Workload

WARMUP_HISTORY: list[Message] = [{"role": "system", "content": "Warm-up."}]  # shares no prefix with the workload


@dataclass(slots=True)
class TurnRecord:
    session_id: str
    turn: int  # 0 = the session's first request (its whole initial history is new)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # as reported by the system; None when it does not say
    ttft_ms: float
    tpot_ms: float | None  # None when fewer than two tokens came back
    e2e_ms: float


@dataclass(slots=True)
class RunResult:
    records: list[TurnRecord]
    wall_s: float  # first submission -> last token, warm-up excluded
    replies: dict[str, list[str]]  # per session, the replies in turn order (to compare systems' outputs)


async def timed_request(
    system: System, session_id: str, turn: int, prompt_ids: list[int], max_new_tokens: int, timeout_s: float | None
) -> tuple[TurnRecord, list[int]]:
    tokens: list[int] = []
    cached: int | None = None
    first: float | None = None
    last = start = time.perf_counter()

    async def consume() -> None:
        nonlocal cached, first, last
        async with aclosing(system.stream(session_id, prompt_ids, max_new_tokens)) as events:
            async for event in events:
                now = time.perf_counter()
                if event.token_ids:
                    if first is None:
                        first = now
                    last = now
                    tokens.extend(event.token_ids)
                if event.cached_tokens is not None:
                    cached = event.cached_tokens

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{session_id} turn {turn}: no complete reply within {timeout_s} s") from None
    end = time.perf_counter()
    first = end if first is None else first
    record = TurnRecord(
        session_id=session_id,
        turn=turn,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(tokens),
        cached_tokens=cached,
        ttft_ms=(first - start) * 1000,
        tpot_ms=(last - first) * 1000 / (len(tokens) - 1) if len(tokens) > 1 else None,
        e2e_ms=(end - start) * 1000,
    )
    return record, tokens


async def warm_up(system: System, renderer: PromptRenderer, max_new_tokens: int, timeout_s: float | None) -> None:
    """One short request, not counted: lazy initialisation, first-call kernels, allocator growth."""
    prompt = renderer.render(WARMUP_HISTORY, "Say hello.", max_new_tokens)
    await timed_request(system, "warmup", 0, prompt, max_new_tokens, timeout_s)
    await system.end_session("warmup")


async def _run_session(
    system: System,
    script: SessionScript,
    renderer: PromptRenderer,
    tokenizer: object,
    max_new_tokens: int,
    timeout_s: float | None,
    records: list[TurnRecord],
    replies: list[str],
    on_turn: Callable[[], None],
    requests: asyncio.Semaphore,
) -> None:
    history = list(script.history)
    for turn, user in enumerate(script.user_turns):
        prompt = renderer.render(history, user, max_new_tokens)
        async with requests:  # FIFO: with fewer slots than sessions, turns interleave round-robin
            record, tokens = await timed_request(system, script.session_id, turn, prompt, max_new_tokens, timeout_s)
        reply = tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        records.append(record)
        replies.append(reply)
        on_turn()
    await system.end_session(script.session_id)


async def run_workload(
    system: System,
    workload: Workload,
    renderer: PromptRenderer,
    tokenizer: object,
    max_new_tokens: int,
    concurrency: int,
    on_turn: Callable[[], None] = lambda: None,
    timeout_s: float | None = None,
    in_flight: int | None = None,
) -> RunResult:
    """Warm up, then run every session; at most `concurrency` sessions are live and `in_flight` requests run at once.

    A live session waiting for a request slot is idle but not ended: its KV is still the system's to keep,
    move or evict — the realistic shape of many chat users, most of them reading at any moment.
    """
    await warm_up(system, renderer, max_new_tokens, timeout_s)
    slots = asyncio.Semaphore(max(1, concurrency))
    requests = asyncio.Semaphore(max(1, in_flight or concurrency))
    records: list[TurnRecord] = []
    replies: dict[str, list[str]] = {script.session_id: [] for script in workload.sessions}

    async def session(script: SessionScript) -> None:
        async with slots:
            await _run_session(
                system,
                script,
                renderer,
                tokenizer,
                max_new_tokens,
                timeout_s,
                records,
                replies[script.session_id],
                on_turn,
                requests,
            )

    start = time.perf_counter()
    tasks = [asyncio.create_task(session(script)) for script in workload.sessions]
    try:
        await asyncio.gather(*tasks)
    except BaseException:  # one session failed: stop the others before reporting
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    wall_s = time.perf_counter() - start
    records.sort(key=lambda r: (r.session_id, r.turn))
    return RunResult(records=records, wall_s=wall_s, replies=replies)
