"""`sessionserve serve` as an operator runs it: a real subprocess with its own Ray, real signals, real HTTP.

"ready" is printed only once /ready answers 200; SIGTERM drains (new turns get 503 + Retry-After, running turns
finish within serving.shutdown_grace_s or are cancelled uncommitted), then Serve and Ray stop, the port closes and
the process exits 0 without Ray's "*** SIGTERM received ***" dump.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from sessions.store import open_store
from tests.serve_process import ServeProcess, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.model]

RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\([\w:.-]+ pid=\d+(, ip=[\d.]+)?\)")
LONG_TURN = 1900  # tokens (its context is 2048); the tiny model makes ~400/s here: several seconds of streaming


@pytest.fixture
def start_serve(smollm2_dir, tmp_path):
    started: list[ServeProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> ServeProcess:
        started.append(ServeProcess.start(config, tmp_path, env=env))
        return started[-1]

    yield start
    for process in started:
        process.close()


def assert_clean_exit(server: ServeProcess, within_s: float, status: int = 0) -> None:
    """`serve` exits with `status` within `within_s`, leaving no port open and no Ray process behind."""
    signalled = time.monotonic()
    code = server.wait(within_s)
    took = time.monotonic() - signalled
    output = server.output()
    assert code == status, output[-5000:]
    assert "SIGTERM received" not in output, output[-5000:]
    # Ray's words when a thread other than the main one calls ray.init(): a Ray call after ray.shutdown() did (its
    # auto-connect), which ends the process with status 1 when it meets the finished core worker.
    assert "current thread is not the main thread" not in output, output[-5000:]
    own = [line for line in server.lines if not RAY_WORKER_LINE.match(line)]  # replicas' logs are forwarded too
    if status == 0:  # a failed start prints Serve's reason, which carries the replica's traceback
        assert not any("Traceback" in line for line in own), "\n".join(own)[-5000:]
    assert not server.port_open(), "the HTTP port is still open after exit"
    deadline = time.monotonic() + 20  # Ray's own processes get a moment to finish exiting after ray.shutdown()
    while server.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not server.leftovers(), f"Ray processes left behind: {server.leftovers()}"
    assert took < within_s


def stream_turn(url: str, sid: str, events: list[tuple[str, dict]], first: threading.Event) -> None:
    """POST a long streaming turn and record its SSE events; `first` is set at the first delta."""
    body = {"prompt": "Tell me a very long story.", "max_new_tokens": LONG_TURN, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/sessions/{sid}/query", json=body, timeout=120) as response:
            if response.status_code != 200:
                events.append(("http", {"status": response.status_code, "body": response.read().decode()}))
                return
            name = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    first.set()
    except httpx.HTTPError as error:  # the connection cut by a cancelled turn
        events.append(("cut", {"error": repr(error)}))
    finally:
        first.set()


def start_long_turn(url: str, sid: str) -> tuple[threading.Thread, list[tuple[str, dict]]]:
    """Start `stream_turn` in a thread and return once its first delta arrived: the turn is running."""
    events: list[tuple[str, dict]] = []
    first = threading.Event()
    streaming = threading.Thread(target=stream_turn, args=(url, sid, events, first))
    streaming.start()
    assert first.wait(60), events
    return streaming, events


def create(url: str, sid: str) -> None:
    response = httpx.post(f"{url}/v1/sessions", json={"session_id": sid}, timeout=60)
    assert response.status_code == 201, response.text


def sigterm_during_a_long_turn(server: ServeProcess, ingress_urls: Sequence[str] = ()) -> dict[str, Any]:
    """SIGTERM while session "long" streams a long turn: a new turn (session "late") is refused with 503 draining +
    Retry-After, through the server's URL and each of `ingress_urls` (every ingress replica drains), the running one
    finishes, the process exits 0. Returns the finished turn's `done` event."""
    create(server.url, "long")
    create(server.url, "late")
    streaming, events = start_long_turn(server.url, "long")
    server.signal(signal.SIGTERM)
    time.sleep(1.5)  # the CLI notices the signal within a second, then asks the ingress to drain
    for url in (server.url, *ingress_urls):
        refused = httpx.post(f"{url}/v1/sessions/late/query", json={"prompt": "hi", "max_new_tokens": 2})
        assert refused.status_code == 503 and "retry-after" in refused.headers, (url, refused.status_code, refused.text)
        assert refused.json()["error"]["code"] == "draining"
    streaming.join(120)
    assert events and events[-1][0] == "done", events[-3:]
    assert_clean_exit(server, within_s=60)
    return events[-1][1]


def test_ready_stays_503_while_the_model_is_not_loaded_and_sigterm_then_exits_0(start_serve, tmp_path):
    # The model replica needs a resource no node has: it never loads, so the server must never say ready.
    config = tiny_config(f"sqlite:///{tmp_path / 'sessions.db'}", 5, replica_resources={"absent_resource": 1})
    server = start_serve(config)
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline and not any(status == 503 for status, _ in seen):
        try:
            response = httpx.get(f"{server.url}/ready", timeout=10)
            seen.append((response.status_code, response.text))
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert seen and seen[-1][0] == 503 and "not_ready" in seen[-1][1], seen[-5:]
    assert 200 not in [status for status, _ in seen]
    time.sleep(2)  # the CLI polls /ready every 0.5 s: it has seen the 503s too
    assert not any("sessionserve ready on" in line for line in server.lines), server.output()
    server.signal(signal.SIGTERM)
    # Within a supervisor's grace (Kubernetes: 30 s): Serve alone waits 45 s on the replica that never started.
    assert_clean_exit(server, within_s=25)


def test_a_model_replica_that_cannot_load_ends_serve_with_status_1_and_serves_nothing(start_serve, tmp_path):
    # Serve retries the replica's constructor, then marks the app DEPLOY_FAILED: serve says why and stops cleanly.
    # (One try per replica instead of Ray's three: the outcome is the same, a replica process start sooner.)
    config = tiny_config(f"sqlite:///{tmp_path / 'sessions.db'}", 5)
    config["model"]["name"] = str(tmp_path / "no-such-model")
    server = start_serve(config, env={"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"})
    assert_clean_exit(server, within_s=240, status=1)
    output = server.output()
    assert "sessionserve could not start: deploying sessionserve failed" in output, output[-5000:]
    assert "no-such-model" in output and not any("sessionserve ready on" in line for line in server.lines)


def test_sigterm_during_a_long_turn_lets_it_finish_within_the_grace_and_commits_it(start_serve, tmp_path):
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    server = start_serve(tiny_config(store, 120))
    server.wait_ready()
    done = sigterm_during_a_long_turn(server)
    assert done["usage"]["completion_tokens"] > 100
    history = open_store(store).messages("long")
    assert [(m.role, m.content) for m in history] == [
        ("user", "Tell me a very long story."),
        ("assistant", done["response"]),
    ]
    assert open_store(store).messages("late") == []


def test_a_turn_still_running_after_a_short_grace_is_cancelled_and_not_committed(start_serve, tmp_path):
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    server = start_serve(tiny_config(store, 0.5))
    server.wait_ready()
    create(server.url, "cut")
    short = httpx.post(f"{server.url}/v1/sessions/cut/query", json={"prompt": "first", "max_new_tokens": 3}, timeout=60)
    assert short.status_code == 200, short.text
    streaming, events = start_long_turn(server.url, "cut")
    server.signal(signal.SIGTERM)
    streaming.join(60)
    assert_clean_exit(server, within_s=60)
    assert not any(name == "done" for name, _ in events), events[-3:]
    history = open_store(store).messages("cut")
    assert [(m.role, m.content) for m in history] == [("user", "first"), ("assistant", short.json()["response"])]


def query(url: str, sid: str, prompt: str, max_new_tokens: int) -> dict:
    response = httpx.post(
        f"{url}/v1/sessions/{sid}/query", json={"prompt": prompt, "max_new_tokens": max_new_tokens}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def first_turns_then_stop(start_serve, config: dict[str, Any], kv_dir: Path, sessions: list[str]) -> dict[str, dict]:
    """Serve, run each session's first turn in order, stop with SIGTERM (the drain writes their KV files): each
    session's first reply."""
    server = start_serve(config)
    server.wait_ready()
    first = {}
    for sid in sessions:
        create(server.url, sid)
        first[sid] = query(server.url, sid, f"Tell me a story about a lighthouse, {sid}.", 48)
    server.signal(signal.SIGTERM)
    assert_clean_exit(server, within_s=90)
    assert len(list(kv_dir.glob("*.safetensors"))) >= len(sessions), "the drain wrote no KV file for some session"
    return first


def test_after_a_restart_sessions_load_their_kv_from_disk_in_the_background_and_through_warm(start_serve, tmp_path):
    """A restart loses every replica: the new one inherits the sessions the ring gives it (the lost replicas' ids
    are gone) and loads the most recently active one's KV file in the background before its next turn; the other
    session's file is loaded by POST /warm. Both next turns reply exactly as a full recompute of the same history."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    config = tiny_config(store, 10)
    config["engine"]["inherit_warm_sessions"] = 1  # the most recently active ("kept") only: "early" waits for /warm
    first = first_turns_then_stop(start_serve, config, tmp_path / "kv", ["early", "kept"])

    restarted = start_serve(config)  # new Ray, new replica ids: the KV dir is what carries over
    restarted.wait_for_line("inherited session warmed session_id=kept")
    line = next(line for line in restarted.lines if "inherited session warmed session_id=kept" in line)
    assert " source=disk " in line, line
    assert not any("inherited session warmed session_id=early" in line for line in restarted.lines)
    warmed = httpx.post(f"{restarted.url}/v1/sessions/early/warm", timeout=120).json()
    assert warmed["source"] == "disk" and warmed["cached_tokens"] >= first["early"]["usage"]["prompt_tokens"], warmed
    for sid in ("early", "kept"):
        history = [{"role": m.role, "content": m.content} for m in open_store(store).messages(sid)]
        body = {"session_id": f"{sid}-control", "messages": history}
        response = httpx.post(f"{restarted.url}/v1/sessions", json=body)
        assert response.status_code == 201, response.text  # same history, never run: its KV must be recomputed
        resumed = query(restarted.url, sid, "And then?", 16)
        control = query(restarted.url, f"{sid}-control", "And then?", 16)
        assert resumed["usage"]["cached_tokens"] >= first[sid]["usage"]["prompt_tokens"], (sid, resumed["usage"])
        assert control["usage"]["cached_tokens"] == 0
        assert resumed["response"] == control["response"], sid  # KV from disk is exact: same reply as a recompute
    assert httpx.get(f"{restarted.url}/ready", timeout=10).status_code == 200
    restarted.signal(signal.SIGINT)  # Ctrl-C stops it as SIGTERM does (the first server above: SIGTERM while idle)
    assert_clean_exit(restarted, within_s=90)
    assert "stopped" in restarted.output()
