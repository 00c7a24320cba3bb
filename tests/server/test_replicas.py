"""Two model replicas behind consistent hashing: sticky sessions, KV reuse per replica, failover without loss."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import REPLICA_HEADER, TINY, app_config, kill_replica, serve_app

pytestmark = pytest.mark.ray

APP, PREFIX = "sessionserve-replicas", "/replicas"


@pytest.fixture(scope="module")
def replicas_url(smollm2_dir, serve_port, tmp_path_factory):
    """2 replicas sharing one SQLite history (the KV is per replica); 1 torch thread each on the 2-core box."""
    store = f"sqlite:///{tmp_path_factory.mktemp('replicas') / 'sessions.db'}"
    # Without the background warm-up of inherited sessions (test_inherit.py's): the failover here rebuilds from history.
    config = app_config(store, model=TINY, replicas=2, torch_threads=1, inherit_warm_sessions=0)
    with serve_app(config, serve_port, APP, PREFIX) as url:
        yield url


@pytest.fixture
def http(replicas_url):
    with httpx.Client(base_url=replicas_url, timeout=120) as client:
        yield client


def new_id() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def create(http: httpx.Client, sid: str) -> None:
    response = http.post("/v1/sessions", json={"session_id": sid})
    assert response.status_code == 201, response.text
    assert REPLICA_HEADER not in response.headers  # the ingress created it in the shared store


def turn(http: httpx.Client, sid: str, prompt: str, max_new_tokens: int = 4) -> httpx.Response:
    response = http.post(f"/v1/sessions/{sid}/query", json={"prompt": prompt, "max_new_tokens": max_new_tokens})
    assert response.status_code == 200, response.text
    return response


def run_session(http: httpx.Client, sid: str, turns: int) -> list[tuple[str, dict]]:
    """(replica, usage) per turn."""
    create(http, sid)
    seen = []
    for number in range(1, turns + 1):
        response = turn(http, sid, f"turn {number}: say something")
        seen.append((response.headers[REPLICA_HEADER], response.json()["usage"]))
    return seen


def test_sessions_stick_to_one_replica_and_reuse_its_kv(http):
    sessions = [new_id() for _ in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(sessions, pool.map(lambda sid: run_session(http, sid, 4), sessions), strict=True))
    owners = {}
    for sid, seen in results.items():
        replicas = {replica for replica, _ in seen}
        assert len(replicas) == 1, f"{sid} moved between replicas: {[r for r, _ in seen]}"
        owners[sid] = replicas.pop()
        usages = [usage for _, usage in seen]
        assert usages[0]["cached_tokens"] == 0, usages
        for number, usage in enumerate(usages[1:], start=2):
            assert usage["cached_tokens"] > 0, f"{sid} turn {number} reused no KV: {usages}"
            assert usage["cached_tokens"] <= usage["prompt_tokens"]
        history = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 4
    assert len(set(owners.values())) == 2, f"16 sessions all landed on one replica: {owners}"
    for sid in sessions:
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_turn_routes_name_the_sessions_replica_and_history_routes_never_reach_one(http):
    """Turns carry the replica header, always the session's replica; history-only operations are answered by the
    ingress from the shared store, so they name no replica."""
    sid = new_id()
    create(http, sid)
    owner = turn(http, sid, "first").headers[REPLICA_HEADER]
    responses = {
        "get": http.get(f"/v1/sessions/{sid}"),
        "query": turn(http, sid, "hello"),
        "append": http.post(f"/v1/sessions/{sid}/messages", json={"messages": [{"role": "user", "content": "x"}]}),
        "messages": http.get(f"/v1/sessions/{sid}/messages"),
        "clear": http.delete(f"/v1/sessions/{sid}/messages"),
        "chat": http.post(
            "/v1/chat/completions",
            headers={"x-session-id": sid},
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        ),
        "destroy": http.delete(f"/v1/sessions/{sid}"),
    }
    for route, response in responses.items():
        assert response.status_code < 300, (route, response.status_code, response.text)
    replicas = {route: response.headers.get(REPLICA_HEADER) for route, response in responses.items()}
    assert replicas == {route: owner if route in ("query", "chat") else None for route in responses}


def test_a_killed_replicas_session_continues_elsewhere_with_its_history(http):
    """Failover (run last in this module: it kills a replica): the next turn answers from the shared history."""
    sid = new_id()
    create(http, sid)
    first = turn(http, sid, "turn 1: remember the word apple")
    second = turn(http, sid, "turn 2: and the word pear")
    victim = second.headers[REPLICA_HEADER]
    assert first.headers[REPLICA_HEADER] == victim
    before = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
    assert len(before) == 4

    kill_replica(APP, victim)

    # Until the ingress' router hears of the death (a busy machine makes that moment longer), a turn routed to the
    # dead replica answers 503 replica_unavailable with Retry-After; the client's retry lands on the other one.
    for _ in range(20):
        third = http.post(f"/v1/sessions/{sid}/query", json={"prompt": "turn 3: list the words", "max_new_tokens": 4})
        if third.status_code != 503:
            break
        assert third.json()["error"]["code"] == "replica_unavailable" and "retry-after" in third.headers
        time.sleep(0.5)
    assert third.status_code == 200, third.text
    assert third.headers[REPLICA_HEADER] != victim
    assert third.json()["usage"]["cached_tokens"] == 0  # the new replica rebuilt the KV from history
    after = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
    assert after[:4] == before
    assert [m["content"] for m in after[::2]] == [
        "turn 1: remember the word apple",
        "turn 2: and the word pear",
        "turn 3: list the words",
    ]
    assert after[-1] == {"role": "assistant", "content": third.json()["response"]}
    info = http.get(f"/v1/sessions/{sid}").json()
    assert info["turns"] == 3 and info["messages"] == 6
