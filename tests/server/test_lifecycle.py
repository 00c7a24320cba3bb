"""Readiness and drain on a real Ray Serve app: /ready reflects the replicas, drain refuses new turns with
503 + Retry-After, lets a running turn finish within the grace, and cancels (without committing) what outlives it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from tests.support import TINY, app_config, assert_error_envelope, serve_app

pytestmark = pytest.mark.ray


@pytest.fixture
def drained_app(tokenizer_dir, serve_port, tmp_path):
    """A fresh app per test: draining is one-way."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    name = f"sessionserve-drain-{time.monotonic_ns()}"
    config = app_config(store, model=TINY, torch_threads=1, max_model_len=2048)
    with serve_app(config, serve_port, name, "/drain") as url:
        yield name, url


def stream_in_background(url: str, sid: str, max_new_tokens: int) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        body = {"prompt": "Tell me a long story.", "max_new_tokens": max_new_tokens, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/sessions/{sid}/query", json=body, timeout=120) as response:
                outcome["status"] = response.status_code
                outcome["text"] = "".join(response.iter_text())
        except httpx.HTTPError as error:
            outcome["error"] = repr(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_ready_then_drain_lets_a_short_turn_finish_and_refuses_new_ones(drained_app):
    name, url = drained_app
    assert httpx.get(f"{url}/ready", timeout=30).json() == {"status": "ready"}
    assert httpx.post(f"{url}/v1/sessions", json={"session_id": "d1"}).status_code == 201
    thread, outcome = stream_in_background(url, "d1", max_new_tokens=24)
    time.sleep(0.3)  # the turn is running
    report = serve.get_app_handle(name).drain.remote(60).result(timeout_s=90)
    thread.join(timeout=60)
    assert report == {"cancelled": 0}
    assert outcome.get("status") == 200 and "event: done" in outcome["text"], outcome
    messages = httpx.get(f"{url}/v1/sessions/d1/messages").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the finished turn was committed

    refused = httpx.post(f"{url}/v1/sessions/d1/query", json={"prompt": "again"})
    assert assert_error_envelope(refused, 503)["code"] == "draining"
    assert refused.headers["retry-after"].isdigit()
    assert httpx.get(f"{url}/ready").status_code == 503
    assert httpx.get(f"{url}/health").status_code == 200  # still alive: liveness is not readiness


def test_drain_cancels_a_turn_that_outlives_the_grace_without_committing_it(drained_app):
    name, url = drained_app
    assert httpx.post(f"{url}/v1/sessions", json={"session_id": "d2"}).status_code == 201
    thread, outcome = stream_in_background(url, "d2", max_new_tokens=2000)  # seconds of decoding
    time.sleep(0.5)  # the turn is running
    report = serve.get_app_handle(name).drain.remote(0.2).result(timeout_s=60)
    thread.join(timeout=60)
    assert report == {"cancelled": 1}
    assert "event: done" not in outcome.get("text", ""), outcome
    messages = httpx.get(f"{url}/v1/sessions/d2/messages").json()["messages"]
    assert messages == []  # nothing of the cancelled turn was stored
