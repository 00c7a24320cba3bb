"""Which prompt tokens a turn recomputed, and why, from the KV report its session's last turn left."""

from sessions.accounting import account_turn
from sessions.store.values import KVReport, TokenUsage


def test_a_first_turn_counts_every_computed_prompt_token():
    account = account_turn(KVReport(), "r1", prompt_tokens=30, cached_tokens=0, completion_tokens=10)
    assert (account.recomputed_tokens, account.reason) == (30, "first_turn")
    assert account.usage == TokenUsage(prompt=30, cached=0, recomputed=30, completion=10, context=40)


def test_a_warm_turn_recomputes_nothing_and_adds_to_the_totals():
    before = KVReport("device", 39, "r1", TokenUsage(30, 0, 30, 10, 40))
    account = account_turn(before, "r1", prompt_tokens=52, cached_tokens=39, completion_tokens=5)
    assert (account.recomputed_tokens, account.reason) == (0, None)
    assert account.usage == TokenUsage(prompt=82, cached=39, recomputed=30, completion=15, context=57)


def test_kv_lost_on_the_same_replica_is_dropped_and_on_another_is_failover():
    before = KVReport("none", 0, "r1", TokenUsage(30, 0, 30, 10, 40))
    dropped = account_turn(before, "r1", prompt_tokens=52, cached_tokens=0, completion_tokens=5)
    assert (dropped.recomputed_tokens, dropped.reason) == (39, "dropped")  # all the last context but its last token
    moved = account_turn(before, "r2", prompt_tokens=52, cached_tokens=16, completion_tokens=5)
    assert (moved.recomputed_tokens, moved.reason) == (23, "failover")


def test_a_mismatch_the_engine_reports_is_stale():
    before = KVReport("host", 39, "r1", TokenUsage(30, 0, 30, 10, 40))
    account = account_turn(before, "r1", prompt_tokens=52, cached_tokens=0, completion_tokens=5, stale=True)
    assert (account.recomputed_tokens, account.reason) == (39, "stale")


def test_token_usage_round_trips_through_json_and_reads_missing_keys_as_zero():
    usage = TokenUsage(1, 2, 3, 4, 5)
    assert TokenUsage.from_json(usage.to_json()) == usage
    assert TokenUsage.from_json("{}") == TokenUsage() == TokenUsage.from_json(None)
