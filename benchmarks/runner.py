"""Drive one system through the workload: concurrent sessions, strictly ordered turns, client-side timing.

Every turn's prompt is the system's own history (the workload's messages plus the replies *this* system
generated) rendered by the shared PromptRenderer. TTFT = submit -> first streamed token, measured here
the same way for every system; TPOT = (last token - first token) / (tokens - 1) per request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from benchmarks.chat import PromptRenderer
from benchmarks.systems import System
from benchmarks.systems.base import StreamEvent, Turn
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
    phases_ms: dict[str, float] | None = None  # where the turn went inside the system, when it reports it


@dataclass(slots=True)
class RunResult:
    records: list[TurnRecord]
    wall_s: float  # first submission -> last token, warm-up excluded
    replies: dict[str, list[str]]  # per session, the replies in turn order (to compare systems' outputs)


async def timed_request(
    system: System, session_id: str, turn_index: int, turn: Turn, timeout_s: float | None, tokenizer: Any
) -> tuple[TurnRecord, str]:
    """One request, timed from submission: TTFT at the first event with output (a token or a content byte)."""
    tokens: list[int] = []
    texts: list[str] = []
    final = StreamEvent()
    first: float | None = None
    last = start = time.perf_counter()

    async def consume() -> None:
        nonlocal first, last
        async with aclosing(system.stream(session_id, turn)) as events:
            async for event in events:
                now = time.perf_counter()
                if event.token_ids or event.text:
                    if first is None:
                        first = now
                    last = now
                    tokens.extend(event.token_ids)
                    texts.append(event.text)
                for name in ("cached_tokens", "prompt_tokens", "completion_tokens", "phases_ms"):
                    if getattr(event, name) is not None:
                        setattr(final, name, getattr(event, name))

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{session_id} turn {turn_index}: no complete reply within {timeout_s} s") from None
    end = time.perf_counter()
    first = end if first is None else first
    completion = final.completion_tokens if final.completion_tokens is not None else len(tokens)
    record = TurnRecord(
        session_id=session_id,
        turn=turn_index,
        prompt_tokens=final.prompt_tokens if final.prompt_tokens is not None else len(turn.prompt_ids),
        completion_tokens=completion,
        cached_tokens=final.cached_tokens,
        ttft_ms=(first - start) * 1000,
        tpot_ms=(last - first) * 1000 / (completion - 1) if completion > 1 else None,
        e2e_ms=(end - start) * 1000,
        phases_ms=final.phases_ms,
    )
    reply = "".join(texts) if any(texts) else tokenizer.decode(tokens, skip_special_tokens=True)
    return record, reply


async def warm_up(
    system: System, renderer: PromptRenderer, tokenizer: Any, max_new_tokens: int, timeout_s: float | None
) -> None:
    """One short request, not counted: lazy initialisation, first-call kernels, allocator growth."""
    user = "Say hello."
    turn = Turn(renderer.render(WARMUP_HISTORY, user, max_new_tokens), user, max_new_tokens)
    await system.begin_session("warmup", list(WARMUP_HISTORY))
    await timed_request(system, "warmup", 0, turn, timeout_s, tokenizer)
    await system.end_session("warmup")


@dataclass(slots=True)
class _Driver:
    """What every session of one run shares."""

    system: System
    renderer: PromptRenderer
    tokenizer: Any
    max_new_tokens: int
    timeout_s: float | None
    records: list[TurnRecord]
    on_turn: Callable[[], None]
    requests: asyncio.Semaphore
    request_rate: float  # > 0: a session waits an exponential think time of mean 1/rate before each request


async def _run_session(driver: _Driver, script: SessionScript, replies: list[str]) -> None:
    system = driver.system
    history = list(script.history)
    await system.begin_session(script.session_id, list(script.history))
    think = random.Random(f"think:{script.session_id}")  # the same arrival times for every system
    for index, user in enumerate(script.user_turns):
        if driver.request_rate > 0:
            await asyncio.sleep(think.expovariate(driver.request_rate))
        max_new = script.max_new_tokens[index] if script.max_new_tokens else driver.max_new_tokens
        turn = Turn(driver.renderer.render(history, user, max_new), user, max_new)
        async with driver.requests:  # FIFO: with fewer slots than sessions, turns interleave round-robin
            record, reply = await timed_request(
                system, script.session_id, index, turn, driver.timeout_s, driver.tokenizer
            )
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        driver.records.append(record)
        replies.append(reply)
        driver.on_turn()
    await system.end_session(script.session_id)


async def run_workload(
    system: System,
    workload: Workload,
    renderer: PromptRenderer,
    tokenizer: Any,
    max_new_tokens: int,
    concurrency: int,
    on_turn: Callable[[], None] = lambda: None,
    timeout_s: float | None = None,
    in_flight: int | None = None,
    request_rate: float = 0.0,
) -> RunResult:
    """Warm up, then run every session; at most `concurrency` sessions are live and `in_flight` requests run at once.

    A live session waiting for a request slot is idle but not ended: its KV is still the system's to keep,
    move or evict — the realistic shape of many chat users, most of them reading at any moment.
    """
    await warm_up(system, renderer, tokenizer, max_new_tokens, timeout_s)
    slots = asyncio.Semaphore(max(1, concurrency))
    records: list[TurnRecord] = []
    replies: dict[str, list[str]] = {script.session_id: [] for script in workload.sessions}
    requests = asyncio.Semaphore(max(1, in_flight or concurrency))
    driver = _Driver(system, renderer, tokenizer, max_new_tokens, timeout_s, records, on_turn, requests, request_rate)

    async def session(script: SessionScript) -> None:
        async with slots:
            await _run_session(driver, script, replies[script.session_id])

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
