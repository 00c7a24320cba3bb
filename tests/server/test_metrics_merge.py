"""Several ingress replicas, one scrape: the answering replica adds up every replica's numbers."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.server.metrics import Metrics, ReplicaReport, TurnSample, render


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def turn(ttft_ms: float) -> TurnSample:
    return TurnSample(ttft_ms=ttft_ms, tpot_ms=None, prompt_tokens=10, cached_tokens=4, completion_tokens=2)


def test_counters_and_histograms_add_up_and_each_model_replicas_gauges_come_from_its_latest_report():
    first, second = Metrics(), Metrics()
    for _ in range(3):
        first.observe_request("/v1/sessions", 201)
    second.observe_request("/v1/sessions", 201)
    second.observe_request("/v1/sessions/{session_id}", 404)
    first.observe_report(ReplicaReport("model-a", {"kv_blocks_used": 5.0}, [turn(30.0)]))
    second.observe_report(ReplicaReport("model-a", {"kv_blocks_used": 7.0}, [turn(300.0), turn(40.0)]))  # later
    second.observe_report(ReplicaReport("model-b", {"kv_blocks_used": 1.0}))
    first.live_sessions.set(12)
    second.live_sessions.set(11)  # counted a moment earlier: the answering replica's own count wins

    merged = samples(render([first.snapshot("ingress-1"), second.snapshot("ingress-2")]))
    assert merged[("sessionserve_requests_total", (("route", "/v1/sessions"), ("status", "201")))] == 4
    assert merged[("sessionserve_errors_total", (("route", "/v1/sessions/{session_id}"), ("status", "404")))] == 1
    assert merged[("sessionserve_ttft_ms_count", ())] == 3
    assert merged[("sessionserve_ttft_ms_sum", ())] == 370
    assert merged[("sessionserve_ttft_ms_bucket", (("le", "50.0"),))] == 2
    assert merged[("sessionserve_prompt_tokens_total", ())] == 30
    assert merged[("sessionserve_engine", (("name", "kv_blocks_used"), ("replica", "model-a")))] == 7
    assert merged[("sessionserve_engine", (("name", "kv_blocks_used"), ("replica", "model-b")))] == 1
    assert merged[("sessionserve_live_sessions", ())] == 12
    assert merged[("sessionserve_ingress_replicas", ())] == 2
    created = ("sessionserve_requests_created", (("route", "/v1/sessions"), ("status", "201")))
    assert merged[created] == samples(render([first.snapshot("ingress-1")]))[created]  # the earlier of the two

    alone = samples(render([second.snapshot("ingress-2")]))
    assert alone[("sessionserve_requests_total", (("route", "/v1/sessions"), ("status", "201")))] == 1
    assert alone[("sessionserve_ingress_replicas", ())] == 1
