"""Operators' log lines, read from the real replica logs Ray writes: one line per turn with the session, replica,
tokens and times, under the request id of the HTTP request (x-request-id, generated and echoed when absent);
`serving.log_format` picks text (key=value) or JSON."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import REPLICA_HEADER, TINY, app_config, logs_dir, serve_app

pytestmark = pytest.mark.ray

TEXT_MARK = " serving.turns: turn "


def turn_lines(request_id: str, timeout: float = 30) -> dict[Path, list[str]]:
    """Every log file's turn lines that carry `request_id`, once at least one has been written."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[Path, list[str]] = {}
        for path in logs_dir().rglob("*"):
            if path.suffix not in (".err", ".out", ".log") or not path.is_file():
                continue
            lines = [
                line
                for line in path.read_text(errors="replace").splitlines()
                if request_id in line and (TEXT_MARK in line or '"message": "turn"' in line)
            ]
            if lines:
                found[path] = lines
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def one_turn_line(request_id: str) -> str:
    found = turn_lines(request_id)
    assert found, f"no turn line with request id {request_id} under {logs_dir()}"
    for path, lines in found.items():
        assert len(lines) == 1, (path, lines)  # one line per turn
    return next(iter(found.values()))[0]


def access_lines(request_id: str, wait_s: float) -> list[str]:
    """Ray Serve's access-log lines for a request (`... <request id> -- POST /route 200 12.3ms`) in any replica's
    log, once there are some or after `wait_s` (Ray writes them as the request ends, around the client's reply)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = [
            line
            for path in (logs_dir() / "serve").glob("replica_*.log")
            for line in path.read_text(errors="replace").splitlines()
            if re.search(rf" {re.escape(request_id)} -- [A-Z]+ \S+ \S+ [\d.]+ms$", line)  # method route status time
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def text_fields(line: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in line.split(TEXT_MARK, 1)[1].split())


def test_text_turn_line_carries_the_given_request_id(http_url):
    sid = f"log-{uuid.uuid4().hex[:12]}"
    request_id = f"req-{uuid.uuid4().hex}"
    assert httpx.post(f"{http_url}/v1/sessions", json={"session_id": sid}, timeout=30).status_code == 201
    response = httpx.post(
        f"{http_url}/v1/sessions/{sid}/query",
        json={"prompt": "Say hi.", "max_new_tokens": 6},
        headers={"x-request-id": request_id},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id  # echoed
    reply = response.json()

    fields = text_fields(one_turn_line(request_id))
    assert fields["request_id"] == request_id and fields["session_id"] == sid
    assert fields["replica"] == response.headers[REPLICA_HEADER]
    for key in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        assert int(fields[key]) == reply["usage"][key], key
    assert float(fields["ttft_ms"]) == pytest.approx(reply["timing"]["ttft_ms"], abs=0.1)
    assert float(fields["total_ms"]) == pytest.approx(reply["timing"]["total_ms"], abs=0.1)
    assert fields["finish_reason"] == reply["finish_reason"]
    # serving.access_log (default true): Ray Serve's line for the request, in the ingress replica's log
    assert any(" -- POST " in line and "/query 200 " in line for line in access_lines(request_id, wait_s=10))


def test_a_streamed_turn_without_request_id_gets_one_generated_and_logged(http_url):
    sid = f"log-{uuid.uuid4().hex[:12]}"
    assert httpx.post(f"{http_url}/v1/sessions", json={"session_id": sid}, timeout=30).status_code == 201
    body = {"prompt": "Count to three.", "max_new_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{http_url}/v1/sessions/{sid}/query", json=body, timeout=120) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        done = json.loads(response.read().decode().split("event: done\ndata: ")[1].split("\n")[0])
    assert request_id

    fields = text_fields(one_turn_line(request_id))
    assert fields["session_id"] == sid and int(fields["completion_tokens"]) == done["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def json_url(tokenizer_dir, serve_port, tmp_path_factory):
    store = f"sqlite:///{tmp_path_factory.mktemp('logs') / 'sessions.db'}"
    config = app_config(store, model=TINY, serving={"log_format": "json", "access_log": False})
    with serve_app(config, serve_port, "sessionserve-logs", "/logs") as url:
        yield url


def test_json_turn_lines_for_session_and_stateless_chat_completions(json_url):
    chat = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    sid = f"log-{uuid.uuid4().hex[:12]}"
    ids = {"session": f"req-{uuid.uuid4().hex}", "stateless": f"req-{uuid.uuid4().hex}"}
    responses = {
        "session": httpx.post(
            f"{json_url}/v1/chat/completions",
            json=chat,
            headers={"x-request-id": ids["session"], "x-session-id": sid},
            timeout=120,
        ),
        "stateless": httpx.post(
            f"{json_url}/v1/chat/completions", json=chat, headers={"x-request-id": ids["stateless"]}, timeout=120
        ),
    }
    for kind, response in responses.items():
        assert response.status_code == 200, response.text
        record = json.loads(one_turn_line(ids[kind]))  # the whole line is one JSON object
        usage = response.json()["usage"]
        assert record["message"] == "turn" and record["level"] == "INFO" and record["logger"] == "serving.turns"
        assert record["request_id"] == ids[kind] and record["replica"] == response.headers[REPLICA_HEADER]
        assert record["session_id"] == (sid if kind == "session" else None)
        assert record["prompt_tokens"] == usage["prompt_tokens"]
        assert record["completion_tokens"] == usage["completion_tokens"]
        assert record["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert 0 <= record["ttft_ms"] <= record["total_ms"] and "time" in record
        # serving.access_log: false: no access line (the default's appears within 10 s: the text test above)
        assert access_lines(ids[kind], wait_s=2) == [], kind
