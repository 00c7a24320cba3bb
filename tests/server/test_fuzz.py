"""Malformed input over HTTP: generated requests (schemathesis, from the app's /openapi.json) never get a 5xx,
explicit bad requests get a 4xx with a clear message, and no refused request changes a session's stored history."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support import TINY, app_config, assert_error_envelope, serve_app

# schemathesis and hypothesis (the test extra) are imported where used: ~3 s that every pytest process collecting this
# file would otherwise spend, `make test-fast`'s workers included, which deselect it (marked ray)
pytestmark = pytest.mark.ray

APP, PREFIX = "sessionserve-fuzz", "/fuzz"
MB = 2**20


@pytest.fixture(scope="module")
def fuzz_url(smollm2_dir, serve_port, tmp_path_factory):
    """Tiny model, a small reply cap and context, so generated valid turns finish fast."""
    store = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'sessions.db'}"
    config = app_config(store, model=TINY, torch_threads=1, serving={"max_new_tokens": 16}, max_model_len=512)
    with serve_app(config, serve_port, APP, PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def http(fuzz_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    """The deployed app's own /openapi.json, as schemathesis reads it."""
    import schemathesis

    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


def operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation, from the app's OpenAPI document (the deployed one is checked equal)."""
    from serving.server.ingress import app

    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]


OPERATIONS = operations()


def snapshot(http: httpx.Client, sid: str) -> tuple:
    """Everything a refused request must leave alone: messages, and the record's prompt, metadata and counts."""
    messages = http.get(f"/v1/sessions/{sid}/messages")
    info = http.get(f"/v1/sessions/{sid}")
    assert messages.status_code == 200 and info.status_code == 200, (messages.text, info.text)
    record = info.json()
    return (
        messages.json()["messages"],
        record["system_prompt"],
        record["metadata"],
        record["turns"],
        record["messages"],
    )


@pytest.fixture(scope="module")
def victim(http) -> str:
    """A session with a system prompt, metadata and two finished turns, that malformed requests aim at."""
    sid = f"victim-{uuid.uuid4().hex[:8]}"
    response = http.post(
        "/v1/sessions", json={"session_id": sid, "system_prompt": "be brief", "metadata": {"team": "fuzz"}}
    )
    assert response.status_code == 201, response.text
    for prompt in ("first turn", "second turn"):
        response = http.post(f"/v1/sessions/{sid}/query", json={"prompt": prompt, "max_new_tokens": 4})
        assert response.status_code == 200, response.text
    return sid


@pytest.fixture
def untouched(http, victim) -> Iterator[str]:
    """The victim session; the test fails if its stored state differs afterwards."""
    before = snapshot(http, victim)
    yield victim
    assert snapshot(http, victim) == before


def check_response(response, label: str = "") -> None:
    """The generated-request property: whatever is sent, never a 5xx (the envelope is checked by explicit tests)."""
    assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:500]}"


# ---- generated requests -------------------------------------------------------------------------------------------


def test_the_deployed_schema_lists_every_operation(api_schema):
    deployed = [(op.method.upper(), op.path) for op in (result.ok() for result in api_schema.get_all_operations())]
    assert sorted(deployed) == sorted(OPERATIONS)


def run_generated(strategy, check) -> None:
    """Run `check(case)` on cases drawn from `strategy` under bounded fuzz settings."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy)
    def generated(case) -> None:
        check(case)

    try:
        generated()
    except Unsatisfiable:  # e.g. negative mode on GET /health: nothing in the operation can be made invalid
        pytest.skip("schemathesis cannot make this operation's inputs invalid")


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_never_get_a_server_error(api_schema, fuzz_url, method, path, mode):
    import schemathesis

    operation = api_schema[path][method]

    def check(case) -> None:
        response = case.call(base_url=fuzz_url, timeout=120)
        check_response(response, f"{case.method} {case.formatted_path} {case.body!r:.300}")

    run_generated(operation.as_strategy(schemathesis.GenerationMode(mode)), check)


POSTS = [(method, path) for method, path in OPERATIONS if method in ("POST", "PATCH")]  # the mutations with a body


@pytest.mark.parametrize(("method", "path"), POSTS, ids=[p for _, p in POSTS])
def test_malformed_posts_leave_an_existing_sessions_history_alone(api_schema, fuzz_url, http, victim, method, path):
    """Malformed POSTs aimed at a live session (its id in the path, in x-session-id, or reused by a create)."""
    import schemathesis

    operation = api_schema[path][method]
    fixed = {}
    if "{session_id}" in path:
        fixed["path_parameters"] = {"session_id": victim}
    if path == "/v1/chat/completions":
        fixed["headers"] = {"x-session-id": victim}
    strategy = operation.as_strategy(schemathesis.GenerationMode.NEGATIVE, **fixed)

    def check(case) -> None:
        if path == "/v1/sessions" and isinstance(case.body, dict):
            case.body = {**case.body, "session_id": victim}
        before = snapshot(http, victim)
        response = case.call(base_url=fuzz_url, timeout=120)
        check_response(response, f"{case.method} {case.formatted_path} {case.body!r:.300}")
        if response.status_code >= 400:
            assert snapshot(http, victim) == before, f"refused {case.method} {case.path} changed the session"

    run_generated(strategy, check)


# ---- explicit bad requests ----------------------------------------------------------------------------------------


def raw(http: httpx.Client, method: str, path: str, content: bytes | str, **kwargs) -> httpx.Response:
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return http.request(method, path, content=content, headers=headers, **kwargs)


SESSION_POSTS = ["/v1/sessions", "/v1/sessions/{sid}/query", "/v1/sessions/{sid}/messages", "/v1/sessions/{sid}/fork"]
ALL_POSTS = [*SESSION_POSTS, "/v1/chat/completions"]


@pytest.mark.parametrize("path", ALL_POSTS)
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"prompt": "hi"', "JSON"),
        ("{'prompt': 'hi'}", "JSON"),
        ("not json at all", "JSON"),
        ("[]", "object"),
        ('"hi"', "object"),
        ("null", ""),
        ("", ""),
    ],
    ids=["truncated", "single-quotes", "text", "array", "string", "null", "empty"],
)
def test_bad_json_is_422_with_a_clear_message(http, untouched, path, content, fragment):
    response = raw(http, "POST", path.format(sid=untouched), content, headers={"x-session-id": untouched})
    error = assert_error_envelope(response, 422)
    assert fragment.lower() in error["message"].lower(), error


def test_wrong_content_type_is_a_4xx(http, untouched):
    response = raw(
        http, "POST", f"/v1/sessions/{untouched}/query", '{"prompt": "hi"}', headers={"content-type": "text/plain"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert_error_envelope(response, response.status_code)


@pytest.mark.parametrize("content", [b"\x80", b"\x00\x00\x00", b'{"prompt": "\xff"}'], ids=["x80", "nul", "latin1"])
def test_undecodable_body_is_a_4xx_in_the_error_envelope(http, untouched, content):
    response = raw(http, "POST", f"/v1/sessions/{untouched}/query", content)
    assert 400 <= response.status_code < 500, response.text
    assert_error_envelope(response, response.status_code)


def test_unknown_route_and_wrong_method_use_the_error_envelope(http, untouched):
    assert_error_envelope(http.get("/v1/no-such-route"), 404)
    assert_error_envelope(http.put(f"/v1/sessions/{untouched}", json={}), 405)


QUERY_CASES = [
    ({"prompt": 123}, "prompt"),
    ({"prompt": ["hi"]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": "many"}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 1.5}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10**6}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 2**70}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 17}, "max_new_tokens"),  # over this app's serving.max_new_tokens
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": 6}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "seed": 2**64}, "seed"),
    ({"prompt": "hi", "seed": "abc"}, "seed"),
    ({"prompt": "hi", "stop": "STOP"}, "stop"),
    ({"prompt": "hi", "stop": [1, 2]}, "stop"),
    ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "hi", "stream": "maybe"}, "stream"),
    ({"prompt": "hi", "max_tokens": 4}, "max_tokens"),  # unknown field: a typo must not be ignored here
    ({"prompt": "hi", "query": "hi"}, "query"),
    ({"prompt": "x" * 1_000_001}, "prompt"),
]


@pytest.mark.parametrize(("body", "fragment"), QUERY_CASES, ids=[f"q{i}" for i in range(len(QUERY_CASES))])
def test_bad_query_is_422_and_names_the_field(http, untouched, body, fragment):
    for stream in (False, True):
        payload = {**body, "stream": stream} if "stream" not in body else body
        error = assert_error_envelope(http.post(f"/v1/sessions/{untouched}/query", json=payload), 422)
        assert fragment in error["message"], error


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 2**40), (1.0, 2**63), (1.0, 2**70), (0.7, 10**30)])
def test_huge_top_k_is_not_a_server_error(http, temperature, top_k):
    """top_k has no upper bound in the schema: beyond the vocabulary it must mean 'keep all' or be a 422, not 500."""
    sid = http.post("/v1/sessions", json={}).json()["session_id"]
    query = {"prompt": "hi", "max_new_tokens": 2, "temperature": temperature, "top_k": top_k, "seed": 1}
    response = http.post(f"/v1/sessions/{sid}/query", json=query)
    assert response.status_code in (200, 422), (response.status_code, response.text[:300])
    stored = len(http.get(f"/v1/sessions/{sid}/messages").json()["messages"])
    assert stored == (2 if response.status_code == 200 else 0)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": temperature}
    response = http.post("/v1/chat/completions", json={**chat, "top_k": top_k})
    assert response.status_code in (200, 422), (response.status_code, response.text[:300])
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204


APPEND_CASES = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": {"role": "user", "content": "x"}}, "messages"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "system", "content": "x"}]}, "system"),
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "text"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "type"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "name"),  # unknown field
    ({"messages": [{"role": "user", "content": "x"}], "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "fragment"), APPEND_CASES, ids=[f"a{i}" for i in range(len(APPEND_CASES))])
def test_bad_append_is_422_and_stores_nothing(http, untouched, body, fragment):
    error = assert_error_envelope(http.post(f"/v1/sessions/{untouched}/messages", json=body), 422)
    assert fragment in error["message"], error


CREATE_CASES = [
    ({"session_id": "bad id!"}, "session id"),
    ({"session_id": "x" * 129}, "session id"),
    ({"session_id": ""}, "session id"),
    ({"session_id": 5}, "session_id"),
    ({"system_prompt": 5}, "system_prompt"),
    ({"metadata": []}, "metadata"),
    ({"metadata": "team"}, "metadata"),
    ({"messages": [{"role": "system", "content": "x"}]}, "system"),
    ({"messages": [{"role": "villain", "content": "x"}]}, "role"),
    ({"sessionid": "typo"}, "sessionid"),  # unknown field
]


@pytest.mark.parametrize(("body", "fragment"), CREATE_CASES, ids=[f"c{i}" for i in range(len(CREATE_CASES))])
def test_bad_create_is_422_and_creates_nothing(http, body, fragment):
    error = assert_error_envelope(http.post("/v1/sessions", json=body), 422)
    assert fragment in error["message"], error
    if isinstance(body.get("session_id"), str) and body["session_id"]:
        assert http.get(f"/v1/sessions/{body['session_id']}").status_code in (404, 422)


def test_recreating_a_live_session_is_409_and_keeps_it(http, untouched):
    body = {"session_id": untouched, "system_prompt": "impostor", "messages": [{"role": "user", "content": "x"}]}
    error = assert_error_envelope(http.post("/v1/sessions", json=body), 409)
    assert untouched in error["message"]


@pytest.mark.parametrize(
    "raw_body",
    [
        '{"metadata": {"score": NaN}}',
        '{"metadata": {"score": Infinity}}',
        '{"system_prompt": "\\ud800"}',
        '{"metadata": {"note": "\\udfff"}}',
        '{"metadata": {"\\ud800": 1}}',
    ],
    ids=["nan", "infinity", "surrogate-prompt", "surrogate-metadata-value", "surrogate-metadata-key"],
)
def test_json_that_python_accepts_but_cannot_be_stored_or_answered_is_4xx(http, raw_body):
    """NaN/Infinity literals and lone surrogates parse in Python's json but cannot be stored or sent back."""
    sid = f"odd-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"session_id": sid})[:-1] + ", " + raw_body[1:]
    response = raw(http, "POST", "/v1/sessions", body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert_error_envelope(response, response.status_code)
    assert http.get(f"/v1/sessions/{sid}").status_code == 404  # a refused create leaves no half session


@pytest.mark.parametrize("depth", [200, 5000, 100_000])
def test_deeply_nested_json_is_a_4xx(http, depth):
    body = '{"metadata": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    response = raw(http, "POST", "/v1/sessions", body)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code == 201:
        assert http.delete(f"/v1/sessions/{response.json()['session_id']}").status_code == 204


CHAT_CASES = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2**70}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "user"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
]


@pytest.mark.parametrize(("body", "fragment"), CHAT_CASES, ids=[f"o{i}" for i in range(len(CHAT_CASES))])
@pytest.mark.parametrize("session", [False, True], ids=["stateless", "session"])
def test_bad_chat_completion_is_422_and_stores_nothing(http, untouched, body, fragment, session):
    headers = {"x-session-id": untouched} if session else {}
    for stream in (False, True):
        response = http.post("/v1/chat/completions", json={**body, "stream": stream}, headers=headers)
        error = assert_error_envelope(response, 422)
        assert fragment in error["message"], error


def test_bad_session_header_is_422(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for sid in ("bad id!", "x" * 129, "a/b"):
        error = assert_error_envelope(http.post("/v1/chat/completions", json=body, headers={"x-session-id": sid}), 422)
        assert "session id" in error["message"], error


def test_unknown_fields_are_ignored_on_chat_completions(http):
    sid = f"oai-{uuid.uuid4().hex[:8]}"
    body = {
        "messages": [{"role": "user", "content": "hi", "name": "bob", "weird": [1]}],
        "max_tokens": 2,
        "logprobs": False,
        "some_future_field": {"x": 1},
    }
    for headers in ({}, {"x-session-id": sid}):
        response = http.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
    assert len(http.get(f"/v1/sessions/{sid}/messages").json()["messages"]) == 2
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/sessions/{sid}/fork", {"session_id": "child", "parent": "x"}),
        ("/v1/sessions/{sid}/query", {"prompt": "hi", "max_new_tokens": 2, "temprature": 0.5}),
        ("/v1/sessions/{sid}/messages", {"messages": [{"role": "user", "content": "x"}], "append": True}),
        ("/v1/sessions", {"session_id": "newone", "system": "x"}),
    ],
    ids=["fork", "query", "append", "create"],
)
def test_unknown_fields_are_422_on_session_routes(http, untouched, path, body):
    error = assert_error_envelope(http.post(path.format(sid=untouched), json=body), 422)
    unknown = next(key for key in body if key not in ("session_id", "prompt", "max_new_tokens", "messages"))
    assert unknown in error["message"], error
    assert http.get("/v1/sessions/child").status_code == 404
    assert http.get("/v1/sessions/newone").status_code == 404


@pytest.mark.parametrize("window", ["0", "-1", "abc", "1.5", ""])
def test_bad_window_is_422(http, untouched, window):
    error = assert_error_envelope(http.get(f"/v1/sessions/{untouched}/messages", params={"window": window}), 422)
    assert "window" in error["message"], error


@pytest.mark.parametrize("window", [2**31, 2**63 - 1, 2**63, 2**70])
def test_huge_window_means_everything_or_422(http, untouched, window):
    response = http.get(f"/v1/sessions/{untouched}/messages", params={"window": str(window)})
    assert response.status_code in (200, 422), (response.status_code, response.text[:300])
    if response.status_code == 200:
        assert response.json()["messages"] == http.get(f"/v1/sessions/{untouched}/messages").json()["messages"]


# ---- huge bodies ----------------------------------------------------------------------------------------------------


def huge_append(sid: str, size: int = 20 * MB) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * size}]}).encode()


def test_huge_body_is_413_and_stores_nothing(http, untouched):
    response = raw(http, "POST", f"/v1/sessions/{untouched}/messages", huge_append(untouched))
    error = assert_error_envelope(response, 413)
    assert "bytes" in error["message"] or "large" in error["message"], error


def test_huge_chat_completion_is_413(http):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (20 * MB)}], "max_tokens": 2})
    assert_error_envelope(raw(http, "POST", "/v1/chat/completions", body), 413)


def test_huge_chunked_body_without_content_length_is_413_too(http, untouched):
    """The limit must hold for a chunked upload (no Content-Length header), not only for a declared length."""
    payload = huge_append(untouched)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), MB):
            yield payload[start : start + MB]

    response = http.post(
        f"/v1/sessions/{untouched}/messages", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error_envelope(response, 413)
