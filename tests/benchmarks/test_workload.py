"""The benchmark's workload and summaries: fast, tokenizer only, no model."""

from __future__ import annotations

import random
import statistics

import pytest

from benchmarks.report import percentile, summarize
from benchmarks.runner import RunResult, TurnRecord
from benchmarks.workload import (
    WorkloadSpec,
    build_workload,
    chat_token_count,
    synthetic_text,
    token_count,
    vllm_multiturn,
)


def test_same_seed_same_messages(tokenizer):
    spec = WorkloadSpec(sessions=3, turns=2, history_tokens=512, seed=7)
    first, second = build_workload(tokenizer, spec), build_workload(tokenizer, spec)
    assert first.system_prompt == second.system_prompt
    assert [(s.session_id, s.history, s.user_turns) for s in first.sessions] == [
        (s.session_id, s.history, s.user_turns) for s in second.sessions
    ]
    other = build_workload(tokenizer, WorkloadSpec(sessions=3, turns=2, history_tokens=512, seed=8))
    assert [s.user_turns for s in other.sessions] != [s.user_turns for s in first.sessions]


def test_a_session_does_not_depend_on_how_many_there_are(tokenizer):
    few = build_workload(tokenizer, WorkloadSpec(sessions=1, turns=2, history_tokens=256))
    many = build_workload(tokenizer, WorkloadSpec(sessions=4, turns=2, history_tokens=256))
    assert few.sessions[0].history == many.sessions[0].history
    assert few.sessions[0].user_turns == many.sessions[0].user_turns


@pytest.mark.parametrize("target", [64, 256, 1024, 2048])
def test_history_is_close_to_the_target(tokenizer, target):
    workload = build_workload(tokenizer, WorkloadSpec(sessions=4, turns=1, history_tokens=target))
    for session in workload.sessions:
        assert session.history_tokens == chat_token_count(tokenizer, session.history)
        assert abs(session.history_tokens - target) <= max(4, target // 100), session.history_tokens


def test_shape_of_a_session(tokenizer):
    spec = WorkloadSpec(sessions=2, turns=5, history_tokens=2048, user_tokens=(20, 40))
    workload = build_workload(tokenizer, spec)
    for session in workload.sessions:
        assert session.history[0] == {"role": "system", "content": workload.system_prompt}  # shared by all
        roles = [m["role"] for m in session.history[1:]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles  # alternating, ends with the assistant
        assert len(session.user_turns) == 5
        for text in session.user_turns:
            assert 20 - 3 <= token_count(tokenizer, text) <= 40  # at most the draw, short of it by < one word
    assert workload.sessions[0].history[1:] != workload.sessions[1].history[1:]


def test_synthetic_text_respects_the_budget(tokenizer):
    rng = random.Random(0)
    for target in (5, 50, 300):
        text = synthetic_text(tokenizer, rng, target)
        assert target - 3 <= token_count(tokenizer, text) <= target
    assert synthetic_text(tokenizer, rng, 0) == ""


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 90) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_summary_has_the_contract_fields():
    def record(session: str, turn: int, ttft: float, cached: int | None) -> TurnRecord:
        return TurnRecord(session, turn, 100 + turn, 4, cached, ttft, 10.0, ttft + 30.0)

    records = [record("a", 0, 100.0, 0), record("a", 1, 10.0, 90), record("b", 0, 200.0, 0), record("b", 1, 20.0, 95)]
    summary = summarize(RunResult(records, wall_s=2.0, replies={}), turns=2)
    assert summary["ttft_ms"] == {"p50": 60.0, "p90": 170.0, "p99": 197.0}
    assert summary["ttft_ms_by_turn"] == [150.0, 15.0]
    assert summary["tpot_ms"]["p50"] == 10.0
    assert summary["throughput_tok_s"] == 8.0
    assert summary["wall_s"] == 2.0
    assert summary["cached_tokens"] == 185 and summary["cached_tokens_by_turn"] == [0, 185]


def test_vllm_multiturn_shape(tokenizer):
    spec = vllm_multiturn(sessions=6, seed=3)
    workload = build_workload(tokenizer, spec)
    assert workload == build_workload(tokenizer, spec)  # seeded
    assert abs(chat_token_count(tokenizer, [workload.sessions[0].history[0]]) - 500) <= 12  # the shared prefix
    assert len({s.history[0]["content"] for s in workload.sessions}) == 1 and workload.sessions[0].history[1:] == []
    turns = [len(s.user_turns) for s in workload.sessions]
    assert all(12 <= n <= 18 for n in turns) and len(set(turns)) > 1
    prefixes = []
    for session in workload.sessions:
        assert session.max_new_tokens is not None and len(session.max_new_tokens) == len(session.user_turns)
        assert all(80 <= n <= 120 for n in session.max_new_tokens)
        assert all(112 <= token_count(tokenizer, user) <= 160 for user in session.user_turns[1:])
        prefix, _, first = session.user_turns[0].rpartition("\n\n")
        assert 112 <= token_count(tokenizer, first) <= 160
        prefixes.append(token_count(tokenizer, prefix))
    assert all(1 <= n <= 2000 for n in prefixes) and len(set(prefixes)) == len(prefixes)  # drawn per session
    assert 500 <= statistics.fmean(prefixes) <= 1500  # lognormal around 1,000
    assert vllm_multiturn(max_turns=3).turns_range == (3, 3)  # a reduced run


def test_summary_reports_phases_and_the_share_outside_the_forward_pass():
    def record(turn: int, forward: float, e2e: float) -> TurnRecord:
        phases = {"forward": forward, "commit": 1.0, "total": e2e - 1}
        return TurnRecord("s", turn, 10, 1, 5, e2e, None, e2e, phases)

    summary = summarize(RunResult([record(0, 90, 100), record(1, 80, 100), record(2, 45, 50)], 1.0, {}), 3)
    assert summary["ttft_ms"]["p99"] == pytest.approx(100)
    assert summary["phases_ms_p50"] == {"forward": 80, "commit": 1.0, "total": 99}
    assert summary["outside_forward_fraction_p50"]["of_client_e2e"] == pytest.approx(0.1)
    assert len(summary["phases_ms_by_request"]) == 3
    assert "phases_ms_p50" not in summarize(RunResult([TurnRecord("s", 0, 1, 1, 0, 1, None, 1)], 1.0, {}), 1)
