"""After a replica loss, the ring's new owners warm the sessions they inherit in the background: a real Ray Serve app
with two model replicas (tiny random model), one killed between turns; the next turn of each inherited session
reuses KV and answers exactly what a cold prefill of the same history answers."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from ray.serve._private.common import DeploymentID

from benchmarks.inherit_warmup import wait_for_warmups
from serving.server.ring import SessionRing, running_replicas
from tests.support import REPLICA_HEADER, TINY, app_config, kill_replica, logs_dir, serve_app

pytestmark = pytest.mark.ray

APP, PREFIX = "sessionserve-inherit", "/inherit"
DEPLOYMENT = DeploymentID(name="LLMServer", app_name=APP)
SESSIONS = 8  # at most: engine.inherit_warm_sessions below covers all of them


@pytest.fixture(scope="module")
def http(smollm2_dir, serve_port, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('inherit') / 'sessions.db'}"
    config = app_config(store, model=TINY, replicas=2, torch_threads=1, inherit_warm_sessions=SESSIONS)
    with serve_app(config, serve_port, APP, PREFIX) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def turn(http: httpx.Client, sid: str, prompt: str) -> httpx.Response:
    response = http.post(f"/v1/sessions/{sid}/query", json={"prompt": prompt, "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    return response


def wait_for_replacement(lost: str, timeout: float = 180) -> frozenset[str]:
    """The running replicas once Serve has replaced the killed one (the ring the routers settle on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = running_replicas(DEPLOYMENT)
        if len(running) == 2 and lost not in running:
            return running
        time.sleep(0.5)
    raise TimeoutError(f"no replacement for replica {lost} within {timeout}s: {running_replicas(DEPLOYMENT)}")


def test_inherited_sessions_are_warm_on_their_new_replica_and_answer_as_a_cold_prefill_would(http):
    replica_of: dict[str, str] = {}  # session -> replica of its first turn
    for _ in range(SESSIONS):
        sid = f"inh-{uuid.uuid4().hex[:10]}"
        assert http.post("/v1/sessions", json={"session_id": sid}).status_code == 201
        replica_of[sid] = turn(http, sid, f"{sid}: tell me a long story about ships").headers[REPLICA_HEADER]
    victim = max(set(replica_of.values()), key=[*replica_of.values()].count)  # the one holding at least half
    lost = [sid for sid, replica in replica_of.items() if replica == victim]
    histories = {sid: http.get(f"/v1/sessions/{sid}/messages").json()["messages"] for sid in lost}

    kill_replica(APP, victim)
    ring = SessionRing(wait_for_replacement(victim), DEPLOYMENT)
    owners = {sid: ring.owner(sid) for sid in lost}
    warmed = wait_for_warmups(owners, logs_dir(), timeout_s=180)
    assert set(warmed) == set(lost), f"warmed by their owners: {sorted(warmed)} of {sorted(lost)}"
    assert {fields["source"] for fields in warmed.values()} == {"recomputed"}  # a killed replica leaves no KV files
    assert all(int(fields["tokens"]) > 0 for fields in warmed.values()), warmed

    for sid in lost:
        twin = f"cold-{sid}"  # the same history, KV never kept: what a cold turn answers
        created = http.post("/v1/sessions", json={"session_id": twin, "messages": histories[sid], "kv": "none"})
        assert created.status_code == 201, created.text
        cold = turn(http, twin, "and then?").json()
        inherited = turn(http, sid, "and then?")
        assert inherited.headers[REPLICA_HEADER] == owners[sid]
        usage = inherited.json()["usage"]
        assert usage["cached_tokens"] >= int(warmed[sid]["tokens"]) > 0, (usage, warmed[sid])
        assert cold["usage"]["cached_tokens"] == 0 and cold["usage"]["prompt_tokens"] == usage["prompt_tokens"]
        assert inherited.json()["response"] == cold["response"]

    metrics = http.get("/metrics").text  # the owners' reports rode on the replies above
    recomputed = next(
        line
        for line in metrics.splitlines()
        if line.startswith('sessionserve_inherited_warmups_total{source="recomputed"}')
    )
    assert float(recomputed.split()[-1]) >= 1, recomputed
