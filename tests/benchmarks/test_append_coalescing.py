"""`python -m benchmarks.append_coalescing` on the test session's PostgreSQL: both ways store every append (the probe
checks it and raises otherwise), and coalescing sends fewer statements than appends."""

from __future__ import annotations

import json

from benchmarks.append_coalescing import main


def test_coalescing_stores_every_append_in_fewer_statements(tmp_path, postgres_url):
    out = tmp_path / "coalescing.json"
    main(["--postgres-url", postgres_url, "--appends", "300", "--busy-ms", "0", "--spread-ms", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["coalesced"]["appends_per_statement"] > 2
    for way in ("each", "coalesced"):
        assert report[way]["wall_ms"] > 0 and report[way]["postgres_cpu_ms"] >= 0
