"""Operator-facing surface: Prometheus /metrics, session and request limits, idle expiry."""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

from serving.client import SessionClient
from serving.config import load_config
from serving.server.protocol import APIError
from tests.support import deploy

pytestmark = pytest.mark.ray

NAME, PREFIX = "sessionserve-limits", "/limits"


@pytest.fixture(scope="module")
def limited_url(smollm2_dir, serve_port, tmp_path_factory):
    config = load_config(
        None,
        {
            "model": {"name": "builtin:tiny-random-llama", "device": "cpu", "torch_threads": 1},
            "engine": {"kv_cache_memory": "64MiB", "host_cache_memory": "64MiB"},
            "sessions": {
                "store": f"sqlite:///{tmp_path_factory.mktemp('limits') / 'sessions.db'}",
                "max_sessions": 3,
                "idle_ttl_s": 3,
            },
            "serving": {"cpus_per_replica": 0.25, "max_new_tokens": 8, "max_prompt_tokens": 64},
        },
    )
    url = deploy(config, serve_port, NAME, PREFIX)
    yield url
    serve.delete(NAME)


def test_max_sessions_is_429_with_a_clear_message(limited_url):
    with SessionClient(limited_url) as client:
        ids = [client.create_session(f"cap-{i}") for i in range(3)]
        with pytest.raises(APIError) as caught:
            client.create_session("cap-3")
        assert caught.value.status == 429 and "3" in caught.value.message
        for sid in ids:
            client.destroy_session(sid)
        client.destroy_session(client.create_session("cap-3"))  # room again once others are gone


def test_request_caps(limited_url):
    with SessionClient(limited_url) as client:
        sid = client.create_session("caps")
        with pytest.raises(APIError) as caught:
            client.query("hi", session_id=sid, max_new_tokens=9)
        assert caught.value.status == 422 and "limit of 8" in caught.value.message
        client.append(
            sid, [{"role": r, "content": f"message {i} " * 20} for i in range(4) for r in ("user", "assistant")]
        )
        reply = client.query("hi", session_id=sid, max_new_tokens=4)
        assert reply.usage.prompt_tokens <= 64  # older turns trimmed to the prompt cap
        with pytest.raises(APIError) as caught:
            client.query("word " * 100, session_id=sid, max_new_tokens=4)
        assert caught.value.status == 413
        assert len(client.history(sid)) == 10
        client.destroy_session(sid)


def test_idle_sessions_expire(limited_url):
    with SessionClient(limited_url) as client:
        sid = client.create_session("idle")
        client.query("hello", session_id=sid, max_new_tokens=2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.session_info(sid)
            except APIError as error:
                assert error.status == 404
                break
            time.sleep(0.5)
        else:
            pytest.fail("idle session was not expired")


def test_metrics_exposes_requests_latency_tokens_and_engine_gauges(limited_url):
    with SessionClient(limited_url) as client:
        sid = client.create_session("metered")
        client.query("hello", session_id=sid, max_new_tokens=4)
        client.query("again", session_id=sid, max_new_tokens=4)
        list(client.stream("streamed", session_id=sid, max_new_tokens=4))
        with pytest.raises(APIError):
            client.session_info("no-such-session")
        client.destroy_session(sid)
    text = httpx.get(f"{limited_url}/metrics").text
    assert 'sessionserve_requests_total{route="/v1/sessions/{session_id}/query",status="200"}' in text
    assert 'sessionserve_errors_total{route="/v1/sessions/{session_id}",status="404"}' in text
    assert "sessionserve_ttft_ms_count" in text and "sessionserve_tpot_ms_count" in text
    cached = next(line for line in text.splitlines() if line.startswith("sessionserve_cached_prompt_tokens_total"))
    assert float(cached.split()[-1]) > 0
    recomputed = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("sessionserve_recomputed_tokens_total{")
    }
    assert set(recomputed) == {"first_turn", "dropped", "failover", "stale"}
    assert recomputed["first_turn"] > 0  # the session's first turn computed its whole prompt
    for gauge in ("running", "waiting"):
        assert f'name="{gauge}"' in text
    live = next(line for line in text.splitlines() if line.startswith("sessionserve_live_sessions "))
    assert float(live.split()[-1]) >= 0  # counted in the store by the ingress at scrape time
