"""`python -m benchmarks.stores` on the test session's PostgreSQL and Redis: every backend measured, JSON written."""

from __future__ import annotations

import json

from benchmarks.stores import BACKENDS, main


def test_store_benchmark_measures_every_backend(tmp_path, postgres_url, redis_url):
    out = tmp_path / "stores.json"
    main(["--turns", "40", "--postgres-url", postgres_url, "--redis-url", redis_url, "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["backends"]) == list(BACKENDS)
    for backend, numbers in report["backends"].items():
        assert numbers["append_per_s"] > 0 and numbers["window_read_per_s"] > 0 and numbers["turn_ms_p50"] > 0
        assert numbers["whole_history_turn_ms_p50"] > 0
        assert numbers["append_route_ms_p50"] > 0
        assert ("meets_target" in numbers) == (backend != "memory")
        assert numbers["thread_load_cpu_ms"] > 0 and numbers["thread_load_wall_ms"] > 0
        on_loop = backend in ("postgresql", "redis")  # the stores whose driver has an asyncio twin
        assert ("loop_load_cpu_ms" in numbers) == on_loop and (not on_loop or numbers["loop_load_wall_ms"] > 0)
    assert report["backends"]["memory"]["store_share_ms_p50"] == 0
    assert report["backends"]["memory"]["whole_history_store_share_ms_p50"] == 0
