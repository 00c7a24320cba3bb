"""The driver's scheduling: live sessions vs requests in flight (a scripted System; no model needed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from benchmarks.runner import run_workload
from benchmarks.systems.base import StreamEvent, Turn
from benchmarks.workload import SessionScript, Workload, WorkloadSpec


class EchoSystem:
    """Replies with one token after a short await; records what was in flight and in which order."""

    name = "echo"

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.order: list[str] = []
        self.ended: list[str] = []

    async def start(self) -> None: ...

    async def begin_session(self, session_id: str, history: list) -> None: ...

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.order.append(session_id)
        try:
            await asyncio.sleep(0.01)
            yield StreamEvent([7], cached_tokens=0)
        finally:
            self.in_flight -= 1

    async def end_session(self, session_id: str) -> None:
        self.ended.append(session_id)

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        return {}


class Renderer:
    name = "test"

    def render(self, history: list, user: str, max_new_tokens: int) -> list[int]:
        return [1] * (len(history) + 1)


class Tokenizer:
    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(tokens)


def _workload(sessions: int, turns: int) -> Workload:
    scripts = [
        SessionScript(session_id=f"s{i}", history=[], user_turns=[f"q{t}" for t in range(turns)], history_tokens=0)
        for i in range(sessions)
    ]
    return Workload(spec=WorkloadSpec(sessions=sessions, turns=turns), system_prompt="", sessions=scripts)


async def test_in_flight_limit_interleaves_live_sessions_round_robin():
    system = EchoSystem()
    result = await run_workload(system, _workload(3, 2), Renderer(), Tokenizer(), 4, concurrency=3, in_flight=1)
    assert system.most_in_flight == 1
    measured = [sid for sid in system.order if sid != "warmup"]
    assert measured == ["s0", "s1", "s2", "s0", "s1", "s2"]  # every session stays live while the others run
    assert len(result.records) == 6 and sorted(system.ended) == ["s0", "s1", "s2", "warmup"]


async def test_concurrency_limit_runs_whole_sessions_one_after_another():
    system = EchoSystem()
    await run_workload(system, _workload(2, 2), Renderer(), Tokenizer(), 4, concurrency=1)
    assert [sid for sid in system.order if sid != "warmup"] == ["s0", "s0", "s1", "s1"]


class TextSystem(EchoSystem):
    """Answers in text (like the full-path systems), with its own token counts and phases on the last event."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: dict[str, list] = {}
        self.users: list[str] = []

    async def begin_session(self, session_id: str, history: list) -> None:
        assert session_id not in self.order, "begin_session must come before the session's first request"
        self.begun[session_id] = history

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        self.order.append(session_id)
        self.users.append(turn.user)
        yield StreamEvent(text="he")
        yield StreamEvent(text="llo")
        yield StreamEvent(prompt_tokens=42, completion_tokens=turn.max_new_tokens, cached_tokens=40, phases_ms={"x": 1})


async def test_text_systems_report_their_own_counts_and_phases():
    system = TextSystem()
    workload = _workload(2, 2)
    workload.sessions[0].history = [{"role": "system", "content": "be brief"}]
    workload.sessions[1].max_new_tokens = [3, 5]  # per-turn reply lengths (the vllm-multiturn preset)
    result = await run_workload(system, workload, Renderer(), Tokenizer(), 4, concurrency=2, request_rate=1000.0)
    assert system.begun["s0"] == [{"role": "system", "content": "be brief"}] and "warmup" in system.begun
    assert result.replies == {"s0": ["hello", "hello"], "s1": ["hello", "hello"]}  # the text, not decoded tokens
    by_session = {(r.session_id, r.turn): r for r in result.records}
    assert [by_session["s1", t].completion_tokens for t in (0, 1)] == [3, 5]
    assert by_session["s0", 0].completion_tokens == 4 and by_session["s0", 0].prompt_tokens == 42
    assert all(r.cached_tokens == 40 and r.phases_ms == {"x": 1} and r.tpot_ms is not None for r in result.records)
    assert sorted(u for u in system.users if u.startswith("q")) == ["q0", "q0", "q1", "q1"]
