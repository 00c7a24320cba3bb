"""`python -m benchmarks.ingress_app`: every route of the ingress app measured in-process, Ray's context restored."""

from __future__ import annotations

import json

import pytest
from ray import serve

from benchmarks.ingress_app import ROUTES, main


@pytest.mark.parametrize("threads", [False, True])
def test_the_ingress_app_benchmark_measures_every_route(tmp_path, threads):
    out = tmp_path / "ingress-app.json"
    before = serve.get_replica_context
    argv = ["--store", "sqlite", "--requests", "24", "--concurrent", "4", "--out", str(out)]
    main(argv + (["--threads"] if threads else []))
    report = json.loads(out.read_text())
    assert report["config"]["threads"] is threads
    assert [route for route in report if route != "config"] == list(ROUTES)
    assert all(report[route]["cpu_ms"] > 0 and report[route]["wall_ms"] > 0 for route in ROUTES)
    assert serve.get_replica_context is before
