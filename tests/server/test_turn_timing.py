"""Where a turn's time went, as both clients receive it: QueryResponse.timing.phases_ms (unary and streamed)."""

from __future__ import annotations

import pytest

from serving.server.protocol import QueryResponse

PHASES = ("store_read", "prompt", "queue", "schedule", "prepare", "forward", "sample", "detok", "commit", "other")


def check_phases(phases: dict[str, float]) -> None:
    assert list(phases) == [*PHASES, "total"]
    assert all(value >= 0 for value in phases.values()), phases
    assert phases["forward"] > 0 and phases["commit"] > 0 and phases["prompt"] > 0 and phases["store_read"] > 0
    named = sum(value for name, value in phases.items() if name != "total")
    assert named == pytest.approx(phases["total"], abs=0.02)  # `other` is the rest: the phases add up


def test_query_reports_its_phases(client):
    sid = client.create_session(system_prompt="Answer briefly.")
    result = client.query("Name a colour.", session_id=sid, max_new_tokens=3)
    check_phases(result.timing.phases_ms)
    assert result.timing.phases_ms["total"] >= result.timing.total_ms  # the turn holds its generation


def test_streamed_turn_ends_with_its_phases(client):
    sid = client.create_session(system_prompt="Answer briefly.")
    events = list(client.stream_events("Name a fruit.", session_id=sid, max_new_tokens=3))
    *pieces, done = events
    assert all(isinstance(piece, str) for piece in pieces) and isinstance(done, QueryResponse)
    assert "".join(pieces) == done.response
    check_phases(done.timing.phases_ms)
