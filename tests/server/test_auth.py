"""API keys: 401 without a valid key, a session belongs to the key that made it (others get 404), /health open."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support import TINY, app_config, assert_error_envelope, serve_app

pytestmark = pytest.mark.ray

APP, PREFIX = "sessionserve-auth", "/auth"
KEY_A, KEY_B = "key-a", "key-b"


@pytest.fixture(scope="module")
def auth_url(smollm2_dir, serve_port, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('auth') / 'sessions.db'}"
    config = app_config(store, model=TINY, api_keys=(KEY_A, KEY_B))
    with serve_app(config, serve_port, APP, PREFIX) as url:
        yield url


def client(url: str, authorization: str | None) -> httpx.Client:
    headers = {"authorization": authorization} if authorization is not None else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


@pytest.fixture
def a(auth_url):
    with client(auth_url, f"Bearer {KEY_A}") as http:
        yield http


@pytest.fixture
def b(auth_url):
    with client(auth_url, f"Bearer {KEY_B}") as http:
        yield http


def new_id() -> str:
    return f"auth-{uuid.uuid4().hex[:12]}"


def owned_session(a: httpx.Client) -> str:
    """A session of key-a with one finished turn."""
    sid = new_id()
    assert a.post("/v1/sessions", json={"session_id": sid, "system_prompt": "be brief"}).status_code == 201
    response = a.post(f"/v1/sessions/{sid}/query", json={"prompt": "hello", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    return sid


def every_route(sid: str) -> list[tuple[str, str, dict]]:
    """(method, path, request kwargs) for every authenticated route, valid apart from the key."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("POST", "/v1/sessions", {"json": {"session_id": new_id()}}),
        ("GET", f"/v1/sessions/{sid}", {}),
        ("POST", f"/v1/sessions/{sid}/query", {"json": {"prompt": "hi", "max_new_tokens": 4}}),
        ("POST", f"/v1/sessions/{sid}/query", {"json": {"prompt": "hi", "max_new_tokens": 4, "stream": True}}),
        ("GET", f"/v1/sessions/{sid}/messages", {}),
        ("POST", f"/v1/sessions/{sid}/messages", {"json": {"messages": [{"role": "user", "content": "x"}]}}),
        ("DELETE", f"/v1/sessions/{sid}/messages", {}),
        ("POST", f"/v1/sessions/{sid}/fork", {"json": {}}),
        ("DELETE", f"/v1/sessions/{sid}", {}),
        ("POST", "/v1/chat/completions", {"json": chat}),
        ("POST", "/v1/chat/completions", {"json": chat, "headers": {"x-session-id": sid}}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "stream": True}}),
        ("GET", "/v1/models", {}),
    ]


def test_health_needs_no_key(auth_url):
    with client(auth_url, None) as anonymous:
        response = anonymous.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", "Bearer", "Basic key-a", "key-a", f"Bearer {KEY_A}x", "Bearer KEY-A"],
    ids=["none", "wrong", "empty", "basic", "no-scheme", "prefix", "case"],
)
def test_every_route_refuses_a_missing_or_wrong_key(auth_url, a, authorization):
    sid = owned_session(a)
    before = a.get(f"/v1/sessions/{sid}/messages").json()
    with client(auth_url, authorization) as intruder:
        for method, path, kwargs in every_route(sid):
            response = intruder.request(method, path, **kwargs)
            error = assert_error_envelope(response, 401)
            assert error["code"] == "unauthorized"
            assert KEY_A not in error["message"] and KEY_B not in error["message"]
    assert a.get(f"/v1/sessions/{sid}/messages").json() == before
    assert a.get(f"/v1/sessions/{sid}").status_code == 200


def test_missing_key_message_says_how_to_send_one(auth_url):
    with client(auth_url, None) as anonymous:
        error = assert_error_envelope(anonymous.get("/v1/models"), 401)
    assert "Authorization: Bearer" in error["message"]


def test_another_keys_session_is_not_found_and_cannot_be_touched(a, b):
    sid = owned_session(a)
    before = a.get(f"/v1/sessions/{sid}/messages").json()
    info = a.get(f"/v1/sessions/{sid}").json()
    for method, path, kwargs in every_route(sid):
        if sid not in path and sid not in kwargs.get("headers", {}).values():
            continue  # routes that do not name the session
        response = b.request(method, path, **kwargs)
        error = assert_error_envelope(response, 404)
        assert sid in error["message"]
    # key-a still sees it exactly as it was; key-b's attempts left no trace
    assert a.get(f"/v1/sessions/{sid}/messages").json() == before
    still = a.get(f"/v1/sessions/{sid}").json()
    assert (still["turns"], still["messages"], still["system_prompt"]) == (
        info["turns"],
        info["messages"],
        info["system_prompt"],
    )
    assert a.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error_envelope(a.get(f"/v1/sessions/{sid}"), 404)


def test_valid_keys_work_and_each_sees_only_its_own(a, b):
    sid_a, sid_b = owned_session(a), owned_session(b)
    assert a.get(f"/v1/sessions/{sid_a}").status_code == 200
    assert b.get(f"/v1/sessions/{sid_b}").status_code == 200
    assert_error_envelope(a.get(f"/v1/sessions/{sid_b}"), 404)
    fork = a.post(f"/v1/sessions/{sid_a}/fork", json={})
    assert fork.status_code == 201, fork.text
    child = fork.json()["session_id"]
    assert_error_envelope(b.get(f"/v1/sessions/{child}"), 404)  # a fork belongs to the forking key
    chat = b.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200, chat.text
    assert b.get("/v1/models").status_code == 200
    for http, sid in ((a, sid_a), (a, child), (b, sid_b)):
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_session_created_through_chat_belongs_to_its_key(a, b):
    sid = new_id()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert a.post("/v1/chat/completions", json=body, headers={"x-session-id": sid}).status_code == 200
    assert_error_envelope(b.post("/v1/chat/completions", json=body, headers={"x-session-id": sid}), 404)
    assert len(a.get(f"/v1/sessions/{sid}/messages").json()["messages"]) == 2
    assert a.delete(f"/v1/sessions/{sid}").status_code == 204
