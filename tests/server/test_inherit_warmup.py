"""The warm-up loop in one process (no Ray cluster): a real SessionService (tiny random model, real SQLite) whose
store holds sessions last served by a replica that is gone; the set of running replicas is this test's input."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve._private.common import DeploymentID

from serving.bootstrap import build_service
from serving.engine.types import SamplingParams
from serving.server.inherit import InheritedWarmup
from serving.server.ring import SessionRing
from serving.service import SessionService, TurnResult, WarmResult
from sessions.messages import Message
from sessions.store.base import KVReport
from tests.support import TINY, app_config

DEPLOYMENT = DeploymentID(name="LLMServer", app_name="inherit-warmup")
ME = "me"


@pytest.fixture
async def service(tokenizer_dir, tmp_path):
    service = build_service(app_config(f"sqlite:///{tmp_path / 'sessions.db'}", model=TINY, torch_threads=1), 1, ME)
    yield service
    await service.shutdown()


def lost_session(service: SessionService, sid: str, active: float, policy: str = "pinned") -> None:
    """A session whose last turn ran on the lost replica, which reported its KV on the device."""
    service.manager.create(sid, kv_policy=policy)
    turn = [Message("user", f"{sid}: a question about boats"), Message("assistant", "an answer about boats")]
    service.manager.store.append(sid, turn, now=active, kv=KVReport("device", 30, "lost"))


def warmup(service: SessionService, limit: int, warmed: list[WarmResult]) -> InheritedWarmup:
    return InheritedWarmup(
        service,
        ME,
        running_replicas=lambda: frozenset({ME}),  # the lost replica is not running; the ring gives all to ME
        ring=lambda running: SessionRing(running, DEPLOYMENT).owner,
        limit=limit,
        on_warm=warmed.append,
    )


async def test_warms_the_most_recent_inherited_sessions_up_to_the_limit(service):
    for sid, active, policy in [("old", 1e9, "pinned"), ("new", 3e9, "pinned"), ("mid", 2e9, "evictable")]:
        lost_session(service, sid, active, policy)
    lost_session(service, "none", 4e9, policy="none")  # the newest, but it keeps no KV
    warmed: list[WarmResult] = []

    await warmup(service, 2, warmed).poll()

    assert [(w.session_id, w.source) for w in warmed] == [("new", "recomputed"), ("mid", "recomputed")]
    tiers = {sid: service.engine.kv_info(sid).tier for sid in ("new", "mid", "old", "none")}
    assert tiers == {"new": "device", "mid": "device", "old": "none", "none": "none"}
    assert all(0 < w.tokens <= service.engine.kv_info(w.session_id).tokens for w in warmed)


async def test_waits_while_the_engine_runs_a_turn_then_warms(service):
    lost_session(service, "inherited", 1e9)
    service.manager.create("busy")
    long_turn = SamplingParams(max_new_tokens=400, ignore_eos=True)
    started = asyncio.Event()

    async def user_turn() -> TurnResult:
        async for event in service.turn("busy", [Message("user", "count to a thousand")], long_turn):
            started.set()
            if isinstance(event, TurnResult):
                return event
        raise AssertionError("the turn ended without a result")

    running = asyncio.create_task(user_turn())
    await started.wait()
    warmed: list[WarmResult] = []
    loop = warmup(service, 8, warmed)

    await loop.poll()
    assert warmed == [] and not running.done()  # the user's turn has the engine: the warm-up only took note

    assert (await running).completion_tokens == 400
    await loop.poll()
    assert [w.session_id for w in warmed] == ["inherited"]
    assert service.engine.kv_info("inherited").tier == "device"


@pytest.fixture
async def slow_service(tokenizer_dir, tmp_path):
    """16-token prefill chunks: warming a long history takes many steps, so a turn can arrive in the middle."""
    config = app_config(f"sqlite:///{tmp_path / 'sessions.db'}", model=TINY, torch_threads=1, max_batch_tokens=16)
    service = build_service(config, 1, ME)
    yield service
    await service.shutdown()


def long_lost_session(service: SessionService, sid: str) -> None:
    service.manager.create(sid)
    turn = [Message("user", "boats " * 600), Message("assistant", "an answer about boats")]
    service.manager.store.append(sid, turn, now=1e9, kv=KVReport("device", 620, "lost"))


async def until_warming(service: SessionService, poll: asyncio.Task[None]) -> None:
    while service.engine.stats()["running"] == 0:
        assert not poll.done(), "the warm-up ended before it was seen running"
        await asyncio.sleep(0.001)


async def one_turn(service: SessionService, sid: str) -> TurnResult:
    async for event in service.turn(sid, [Message("user", "and then?")], SamplingParams(max_new_tokens=4)):
        if isinstance(event, TurnResult):
            return event
    raise AssertionError("the turn ended without a result")


async def test_a_turn_of_the_session_being_warmed_takes_over(slow_service):
    long_lost_session(slow_service, "inherited")
    warmed: list[WarmResult] = []
    loop = warmup(slow_service, 8, warmed)
    polling = asyncio.create_task(loop.poll())
    await until_warming(slow_service, polling)

    result = await one_turn(slow_service, "inherited")
    await polling

    assert result.finish_reason == "length" and warmed == []  # the warm-up was cancelled, the turn ran
    await loop.poll()
    assert warmed == []  # and it is not warmed again: the turn did that


async def test_a_turn_of_another_session_interrupts_a_warm_up_which_resumes_when_the_engine_is_idle(slow_service):
    long_lost_session(slow_service, "inherited")
    slow_service.manager.create("other")
    warmed: list[WarmResult] = []
    loop = warmup(slow_service, 8, warmed)
    polling = asyncio.create_task(loop.poll())
    await until_warming(slow_service, polling)

    turn = asyncio.create_task(one_turn(slow_service, "other"))
    await polling  # returns once the warm-up yielded: the engine is busy with the turn
    assert warmed == []

    assert (await turn).finish_reason == "length"
    await loop.poll()
    assert [w.session_id for w in warmed] == ["inherited"]  # what the interrupted warm-up computed is reused
    assert slow_service.engine.kv_info("inherited").tokens >= warmed[0].tokens > 600
