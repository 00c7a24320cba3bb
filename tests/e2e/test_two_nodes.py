"""Two real Ray nodes on this machine: one model replica per node, a network history store, and a node lost
between turns. Every session goes on from the surviving node with its whole history; sessions that lived on the
lost node rebuild their KV from that history (cached_tokens == 0 on their next turn).

The test process never calls `ray.init` (the suite's in-process cluster fixture may be alive in it): Ray driver work
runs in `python -m tests.cluster ...` subprocesses, turns go over HTTP, and a node is lost by SIGKILL of its
process group (tests/cluster.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.cluster import TwoNodeCluster, free_port, two_node_cluster
from tests.paths import REPO
from tests.serve_process import ServeProcess, tiny_config
from tests.support import REPLICA_HEADER, TINY, app_config, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.model]

APP = "sessionserve-2n"
PER_REPLICA = 2  # sessions wanted on each replica before the node is lost


@pytest.fixture
def cluster(smollm2_dir):
    with two_node_cluster() as running:
        yield running


@pytest.fixture
def head_only(smollm2_dir):
    with two_node_cluster(join_worker=False) as running:
        yield running


@pytest.fixture(params=["postgresql", "redis"])
def network_store(request) -> str:
    """A store every node reaches: the `postgres_url` / `redis_url` fixtures start real servers."""
    return request.getfixturevalue({"postgresql": "postgres_url", "redis": "redis_url"}[request.param])


def turn(http: httpx.Client, sid: str, prompt: str) -> httpx.Response:
    response = http.post(f"/v1/sessions/{sid}/query", json={"prompt": prompt, "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    return response


def history(http: httpx.Client, sid: str) -> list[tuple[str, str]]:
    response = http.get(f"/v1/sessions/{sid}/messages")
    assert response.status_code == 200, response.text
    return [(m["role"], m["content"]) for m in response.json()["messages"]]


def placement(cluster: TwoNodeCluster) -> dict[str, str]:
    return json.loads(cluster.driver("placement", APP))


def wait_for_placement(cluster: TwoNodeCluster, want: set[str], timeout: float = 60) -> dict[str, str]:
    """Poll until the alive model replicas sit exactly on the nodes in `want`."""
    deadline = time.monotonic() + timeout
    while set((placed := placement(cluster)).values()) != want or len(placed) != len(want):
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas on {placed}, wanted one on each of {want}\n{cluster.logs()}")
        time.sleep(1)
    return placed


def test_sessions_survive_the_loss_of_a_node(cluster, network_store, tmp_path):
    config = app_config(
        network_store,
        model=TINY,
        replicas=2,
        torch_threads=1,
        serving={"replica_resources": {"sessionserve_model": 1}, "cpus_per_replica": 0.5},
        inherit_warm_sessions=0,  # the lost node's sessions rebuild from history here; the warm-up is test_inherit.py's
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    port = free_port()
    cluster.driver("deploy", str(path), str(port), APP)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    nodes = wait_for_placement(cluster, {"head", "worker"})  # one replica per node: the custom resource pins them

    with httpx.Client(base_url=url, timeout=60) as http:
        owner: dict[str, str] = {}  # session -> replica, from the first turn's header
        while min(list(owner.values()).count(r) for r in nodes) < PER_REPLICA:
            assert len(owner) < 40, f"40 sessions and still not {PER_REPLICA} on each replica: {owner}"
            sid = f"2n-{uuid.uuid4().hex[:10]}"
            assert http.post("/v1/sessions", json={"session_id": sid}).status_code == 201
            owner[sid] = turn(http, sid, "turn 1: hello").headers[REPLICA_HEADER]
        for sid, replica in owner.items():
            second = turn(http, sid, "turn 2: go on")
            assert second.headers[REPLICA_HEADER] == replica
            assert second.json()["usage"]["cached_tokens"] > 0
        before = {sid: history(http, sid) for sid in owner}
        assert all(len(messages) == 4 for messages in before.values()), before

        cluster.kill_worker()  # the worker node's raylet and every process on it, at once
        lost = {r for r, node in nodes.items() if node == "worker"}
        survivor = wait_for_placement(cluster, {"head"})
        assert set(survivor) == {r for r, node in nodes.items() if node == "head"}

        for sid, replica in owner.items():
            third = turn(http, sid, "turn 3: still there?")
            assert third.headers[REPLICA_HEADER] in survivor
            cached = third.json()["usage"]["cached_tokens"]
            if replica in lost:
                assert cached == 0, f"{sid} came from the lost node but reused {cached} cached tokens"
            else:
                assert cached > 0, f"{sid} stayed on the surviving replica but lost its KV"
            after = history(http, sid)
            assert after[:4] == before[sid], f"{sid} lost committed turns"
            assert [role for role, _ in after] == ["user", "assistant"] * 3
            assert after[4] == ("user", "turn 3: still there?")


def test_serve_with_sqlite_on_two_nodes_is_refused(cluster, tmp_path):
    config = tmp_path / "sqlite.yaml"
    config.write_text(f"sessions: {{store: 'sqlite:///{tmp_path / 'sessions.db'}'}}\nmodel: {{name: '{TINY}'}}\n")
    env = {**cluster.env, "SESSIONSERVE_DATA_DIR": str(tmp_path)}
    env.pop("RAY_ADDRESS")  # the flag alone must join the cluster
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), "--address", cluster.address,
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    assert "refusing to start" in result.stderr and "2 alive nodes" in result.stderr, result.stderr[-3000:]
    assert "postgresql://" in result.stderr and "redis://" in result.stderr
    assert not (tmp_path / "sessions.db").exists()  # refused before anything opened the store
    assert time.monotonic() - started < 60


def test_serve_joins_with_address_then_warns_when_a_second_node_joins(head_only, tmp_path):
    """sqlite on a one-node cluster is allowed; a node joining while serving is a warning; SIGTERM still stops us
    cleanly and leaves the cluster (not ours) running."""
    config = tiny_config(f"sqlite:///{tmp_path / 'sessions.db'}", 5, replica_resources={"sessionserve_model": 1})
    env = {"RAY_AUTH_MODE": "disabled"}  # as every process of this cluster (tests/cluster.py cluster_env)
    server = ServeProcess.start(config, tmp_path, args=["--address", head_only.address], env=env)
    try:
        server.wait_ready()
        assert not any("warning:" in line for line in server.lines), server.output()[-3000:]
        head_only.join_worker()
        server.wait_for_line("warning: a node joined while serving", timeout=30)
        warning = next(line for line in server.lines if "warning: a node joined" in line)
        assert "2 alive nodes" in warning and "postgresql://" in warning and "redis://" in warning
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0, server.output()[-5000:]
        assert not server.port_open()
        assert len(json.loads(head_only.driver("nodes", "2"))) == 2  # we disconnected; the cluster lives on
    finally:
        server.close()
