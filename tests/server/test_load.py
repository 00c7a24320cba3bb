"""Concurrent sessions over HTTP on 2 replicas: no errors, no lost or reordered turns, sessions stay put."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.support import REPLICA_HEADER, TINY, app_config, serve_app

pytestmark = pytest.mark.ray

APP, PREFIX = "sessionserve-load", "/load"
SESSIONS, TURNS = 32, 5


@pytest.fixture(scope="module")
def load_url(smollm2_dir, serve_port, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('load') / 'sessions.db'}"
    config = app_config(store, model=TINY, replicas=2, torch_threads=1)
    with serve_app(config, serve_port, APP, PREFIX) as url:
        yield url


def prompt(session: int, turn: int) -> str:
    return f"session {session} turn {turn}: reply briefly"


async def run_session(http: httpx.AsyncClient, index: int, errors: list[str]) -> tuple[str, list[str], set[str]]:
    """Create a session and run its turns one after another; returns (id, replies, replicas seen)."""
    sid = f"load-{index}-{uuid.uuid4().hex[:8]}"
    replies: list[str] = []
    replicas: set[str] = set()
    response = await http.post("/v1/sessions", json={"session_id": sid})
    if response.status_code != 201:
        errors.append(f"{sid} create: {response.status_code} {response.text[:200]}")
        return sid, replies, replicas
    assert REPLICA_HEADER not in response.headers  # created by the ingress, straight in the store
    for turn in range(1, TURNS + 1):
        try:
            response = await http.post(
                f"/v1/sessions/{sid}/query", json={"prompt": prompt(index, turn), "max_new_tokens": 4}
            )
        except httpx.HTTPError as error:
            errors.append(f"{sid} turn {turn}: {type(error).__name__} {error}")
            return sid, replies, replicas
        if response.status_code != 200:
            errors.append(f"{sid} turn {turn}: {response.status_code} {response.text[:200]}")
            return sid, replies, replicas
        replies.append(response.json()["response"])
        replicas.add(response.headers.get(REPLICA_HEADER, "?"))
    return sid, replies, replicas


async def run_load(url: str) -> tuple[list, list[str], float]:
    errors: list[str] = []
    limits = httpx.Limits(max_connections=SESSIONS * 2, max_keepalive_connections=SESSIONS * 2)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        results = await asyncio.gather(*(run_session(http, index, errors) for index in range(SESSIONS)))
    return results, errors, time.perf_counter() - start


def test_concurrent_sessions_lose_and_reorder_nothing(load_url):
    results, errors, wall = asyncio.run(run_load(load_url))
    assert errors == [], f"{len(errors)} errors, first: {errors[:5]}"
    owners = set()
    with httpx.Client(base_url=load_url, timeout=60) as http:
        for index, (sid, replies, replicas) in enumerate(results):
            assert len(replicas) == 1, f"{sid} moved between replicas {replicas}"
            owners |= replicas
            history = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
            assert len(history) == 2 * TURNS, (sid, history)
            assert [m["role"] for m in history] == ["user", "assistant"] * TURNS
            assert [m["content"] for m in history[::2]] == [prompt(index, t) for t in range(1, TURNS + 1)]
            assert [m["content"] for m in history[1::2]] == replies
            info = http.get(f"/v1/sessions/{sid}").json()
            assert info["turns"] == TURNS and info["messages"] == 2 * TURNS
            assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert len(owners) == 2, f"all {SESSIONS} sessions on one replica: {owners}"
    print(f"{SESSIONS} sessions x {TURNS} turns in {wall:.1f}s ({SESSIONS * TURNS / wall:.1f} turns/s)")


async def burst(url: str, sid: str, turns: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        return await asyncio.gather(
            *(
                http.post(f"/v1/sessions/{sid}/query", json={"prompt": f"burst turn {turn}", "max_new_tokens": 4})
                for turn in range(turns)
            )
        )


def test_concurrent_turns_of_one_session_run_one_at_a_time(load_url):
    """Turns sent at once to one session queue behind each other; each reply lands right after its prompt."""
    with httpx.Client(base_url=load_url, timeout=60) as http:
        sid = http.post("/v1/sessions", json={}).json()["session_id"]
        responses = asyncio.run(burst(load_url, sid, 6))
        assert [r.status_code for r in responses] == [200] * 6, [r.text[:200] for r in responses]
        assert len({r.headers[REPLICA_HEADER] for r in responses}) == 1
        history = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 6
        assert sorted(m["content"] for m in history[::2]) == sorted(f"burst turn {t}" for t in range(6))
        # a turn commits its prompt and reply together: each stored pair is one request's prompt and reply
        replies = {f"burst turn {t}": r.json()["response"] for t, r in enumerate(responses)}
        for user, assistant in zip(history[::2], history[1::2], strict=True):
            assert assistant["content"] == replies[user["content"]]
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
