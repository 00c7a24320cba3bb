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
