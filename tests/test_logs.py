"""serving/logs.py in-process: text and JSON render the same structured fields; configuring again replaces."""

from __future__ import annotations

import json
import logging

import pytest

from serving.logs import LOGGERS, configure_logging


@pytest.fixture
def restore_loggers():
    saved = {name: list(logging.getLogger(name).handlers) for name in LOGGERS}
    yield
    for name, handlers in saved.items():
        logging.getLogger(name).handlers[:] = handlers


def emit() -> None:
    logging.getLogger("serving.turns").info("turn", extra={"request_id": "r-1", "session_id": None, "ttft_ms": 12.5})


def test_text_then_json_with_the_same_fields(restore_loggers, capsys):
    configure_logging("text")
    emit()
    text = capsys.readouterr().err.strip()
    assert text.endswith(" INFO serving.turns: turn request_id=r-1 session_id=None ttft_ms=12.5"), text

    configure_logging("json")  # replaces the text handler: one line per record, not two
    emit()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {k: record[k] for k in ("level", "logger", "message", "request_id", "session_id", "ttft_ms")} == {
        "level": "INFO",
        "logger": "serving.turns",
        "message": "turn",
        "request_id": "r-1",
        "session_id": None,
        "ttft_ms": 12.5,
    }
    assert "time" in record
