"""The Ray Serve app on a network store (real PostgreSQL and Redis servers on loopback): the ingress serves
history-only operations from the store, ordered against turns by the store's lease; a stopped store answers 503
`store_unavailable` without half-written state, a running turn's commit waits for it, and recovery needs no
restart."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.servers import start_postgres, start_redis
from tests.support import REPLICA_HEADER, TINY, app_config, assert_error_envelope, serve_app

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", params=["postgresql", "redis"])
def store_server(request):
    server = start_postgres() if request.param == "postgresql" else start_redis(durable=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def app_url(store_server, serve_port, tokenizer_dir):
    base = app_config(store_server.url, model=TINY, torch_threads=1, max_model_len=2048)
    config = base.model_copy(update={"sessions": base.sessions.model_copy(update={"commit_timeout_s": 60})})
    name = f"sessionserve-network-{type(store_server).__name__}"
    with serve_app(config, serve_port, name, "/network") as url:
        yield url


def long_turn(url: str, sid: str, outcome: dict, max_new_tokens: int = 1500) -> threading.Thread:
    """A streaming turn of seconds (the tiny model rarely stops early), run in the background."""

    def run() -> None:
        body = {"prompt": "Tell me everything.", "max_new_tokens": max_new_tokens, "stream": True}
        with httpx.stream("POST", f"{url}/v1/sessions/{sid}/query", json=body, timeout=120) as response:
            outcome["status"] = response.status_code
            outcome["text"] = "".join(response.iter_text())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until_busy(url: str, sid: str, metadata: dict) -> None:
    """Until the turn holds the session's lease: an edit from the ingress (here a PATCH that changes nothing) is
    refused as busy."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.patch(f"{url}/v1/sessions/{sid}", json={"metadata": metadata})
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "session_busy"
            return
        assert response.status_code == 200, response.text
        time.sleep(0.05)
    raise AssertionError("the turn never took the session's lease")


def wait_until_answered(url: str, within_s: float = 30) -> httpx.Response:
    """GET until it is not a 503 store_unavailable: a restarted store's connections come back within seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            response = httpx.get(url, timeout=10)
        except httpx.TimeoutException:
            response = None
        if response is not None and response.status_code != 503:
            assert response.status_code == 200, response.text
            return response
        assert time.monotonic() < deadline, f"{url} still failing {within_s}s after the store came back"
        time.sleep(0.5)


def test_history_operations_come_from_the_store_and_are_ordered_with_turns(app_url):
    created = httpx.post(f"{app_url}/v1/sessions", json={"session_id": "n1", "metadata": {"title": "first"}})
    assert created.status_code == 201 and REPLICA_HEADER not in created.headers
    patched = httpx.patch(f"{app_url}/v1/sessions/n1", json={"metadata": {"title": "renamed"}})
    assert patched.status_code == 200 and patched.json()["metadata"] == {"title": "renamed"}
    listed = httpx.get(f"{app_url}/v1/sessions").json()["sessions"]
    assert [s["metadata"] for s in listed if s["session_id"] == "n1"] == [{"title": "renamed"}]

    outcome: dict = {}
    thread = long_turn(app_url, "n1", outcome, max_new_tokens=600)
    wait_until_busy(app_url, "n1", {"title": "renamed"})
    append = httpx.post(f"{app_url}/v1/sessions/n1/messages", json={"messages": [{"role": "user", "content": "x"}]})
    assert assert_error_envelope(append, 409)["code"] == "session_busy"
    assert assert_error_envelope(httpx.delete(f"{app_url}/v1/sessions/n1/messages"), 409)["code"] == "session_busy"
    assert assert_error_envelope(httpx.delete(f"{app_url}/v1/sessions/n1"), 409)["code"] == "session_busy"
    thread.join(timeout=120)
    assert outcome["status"] == 200 and "event: done" in outcome["text"]

    messages = httpx.get(f"{app_url}/v1/sessions/n1/messages").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the refused edits left nothing behind
    info = httpx.get(f"{app_url}/v1/sessions/n1").json()
    assert info["turns"] == 1 and info["kv"]["tier"] == "device" and info["kv"]["tokens"] > 0  # reported by the replica
    assert httpx.delete(f"{app_url}/v1/sessions/n1").status_code == 204
    assert httpx.get(f"{app_url}/v1/sessions/n1").status_code == 404


def test_a_stopped_store_is_503_a_running_turn_waits_for_it_and_recovery_needs_no_restart(app_url, store_server):
    assert httpx.post(f"{app_url}/v1/sessions", json={"session_id": "n2"}).status_code == 201
    outcome: dict = {}
    thread = long_turn(app_url, "n2", outcome)
    wait_until_busy(app_url, "n2", {})
    store_server.stop()
    try:
        down = httpx.get(f"{app_url}/v1/sessions/n2", timeout=60)
        assert assert_error_envelope(down, 503)["code"] == "store_unavailable"
        assert down.headers["retry-after"].isdigit()
        refused = httpx.post(f"{app_url}/v1/sessions", json={"session_id": "n3"}, timeout=60)
        assert assert_error_envelope(refused, 503)["code"] == "store_unavailable"
        assert httpx.get(f"{app_url}/ready", timeout=60).status_code == 503
    finally:
        store_server.start()
    thread.join(timeout=120)
    assert outcome["status"] == 200 and "event: done" in outcome["text"], outcome  # kept streaming, then committed
    recovered = wait_until_answered(f"{app_url}/v1/sessions/n2/messages")  # the pools reconnect on their own
    messages = recovered.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert httpx.get(f"{app_url}/v1/sessions/n3").status_code == 404  # the refused create wrote nothing
    assert httpx.post(f"{app_url}/v1/sessions", json={"session_id": "n3"}).status_code == 201
    assert httpx.get(f"{app_url}/ready", timeout=60).status_code == 200
