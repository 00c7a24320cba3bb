"""Prometheus metrics, kept by the ingress and served at /metrics.

Model replicas live in other processes, so they hand their numbers to the ingress with every reply
(`ReplicaReport`: gauges + the turns finished since the last report); the ingress is the one place an
operator scrapes. With several ingress replicas, each keeps the numbers of the requests it served; the one that
answers a scrape adds up every replica's `MetricsSnapshot` (`render`), so any of them answers for all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from serving.service import WarmSource
from sessions.accounting import RECOMPUTE_REASONS

_LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


@dataclass(frozen=True, slots=True)
class TurnSample:
    ttft_ms: float
    tpot_ms: float | None  # None when a turn produced one token or fewer
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    recomputed_tokens: int = 0
    recompute_reason: str | None = None  # sessions.accounting.RecomputeReason; None when nothing was recomputed


@dataclass(slots=True)
class ReplicaReport:
    """What a model replica tells the ingress alongside a reply."""

    replica: str
    gauges: dict[str, float] = field(default_factory=dict)
    turns: list[TurnSample] = field(default_factory=list)
    inherited_warmups: list[WarmSource] = field(default_factory=list)  # since the last report, by where KV came from


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One ingress replica's numbers, and when it last heard from each model replica (whose gauges it relays)."""

    replica: str  # the ingress replica's id
    families: list[Metric]
    reported_at: dict[str, float]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sessionserve_requests", "HTTP requests", ["route", "status"], registry=r)
        self.errors = Counter("sessionserve_errors", "HTTP requests answered 4xx/5xx", ["route", "status"], registry=r)
        self.ttft = Histogram("sessionserve_ttft_ms", "time to first token", buckets=_LATENCY_BUCKETS_MS, registry=r)
        self.tpot = Histogram(
            "sessionserve_tpot_ms", "time per output token after the first", buckets=_LATENCY_BUCKETS_MS, registry=r
        )
        self.prompt_tokens = Counter("sessionserve_prompt_tokens", "prompt tokens of finished turns", registry=r)
        self.cached_tokens = Counter(
            "sessionserve_cached_prompt_tokens", "prompt tokens whose KV was reused instead of computed", registry=r
        )
        self.completion_tokens = Counter("sessionserve_completion_tokens", "generated tokens", registry=r)
        self.recomputed_tokens = Counter(
            "sessionserve_recomputed_tokens",
            "prompt tokens computed again although an earlier turn of the session had computed them (or a first "
            "turn's), by reason",
            ["reason"],
            registry=r,
        )
        for reason in RECOMPUTE_REASONS:  # every reason shows, at 0 until it happens
            self.recomputed_tokens.labels(reason)
        self.inherited_warmups = Counter(
            "sessionserve_inherited_warmups",
            "sessions a replica warmed in the background after inheriting them from a lost replica, by where their "
            "KV came from (disk: the node's KV files; recomputed: from the history)",
            ["source"],
            registry=r,
        )
        for source in get_args(WarmSource):
            self.inherited_warmups.labels(source)
        self.engine = Gauge("sessionserve_engine", "engine gauges per replica", ["replica", "name"], registry=r)
        self.live_sessions = Gauge("sessionserve_live_sessions", "sessions in the history store", registry=r)
        self.reported_at: dict[str, float] = {}  # model replica -> when its last report came

    def observe_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def observe_report(self, report: ReplicaReport | None) -> None:
        if report is None:
            return
        self.reported_at[report.replica] = time.time()
        for name, value in report.gauges.items():
            if isinstance(value, int | float):  # numbers only: a metric must never fail a request
                self.engine.labels(report.replica, name).set(value)
        for turn in report.turns:
            self.ttft.observe(turn.ttft_ms)
            if turn.tpot_ms is not None:
                self.tpot.observe(turn.tpot_ms)
            self.prompt_tokens.inc(turn.prompt_tokens)
            self.cached_tokens.inc(turn.cached_tokens)
            self.completion_tokens.inc(turn.completion_tokens)
            if turn.recompute_reason is not None:
                self.recomputed_tokens.labels(turn.recompute_reason).inc(turn.recomputed_tokens)
        for source in report.inherited_warmups:
            self.inherited_warmups.labels(source).inc()

    def snapshot(self, replica: str) -> MetricsSnapshot:
        return MetricsSnapshot(replica, list(self.registry.collect()), dict(self.reported_at))


class _Families:
    """A collector of fixed metric families: how merged numbers become Prometheus' text format."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> list[Metric]:
        return self.families


def merge(snapshots: Sequence[MetricsSnapshot]) -> list[Metric]:
    """Every ingress replica's numbers as one: counters and histograms add up (a series' creation time is the
    earliest), a model replica's engine gauges come from the ingress it reported to last, and other gauges (live
    sessions, counted from the shared store) from the first snapshot, the answering replica's own."""
    newest: dict[str, int] = {}  # model replica -> index of the snapshot with its latest report
    for index, snapshot in enumerate(snapshots):
        for replica, at in snapshot.reported_at.items():
            if replica not in newest or at >= snapshots[newest[replica]].reported_at[replica]:
                newest[replica] = index
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, snapshot in enumerate(snapshots):
        for family in snapshot.families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            series = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type == "gauge":
                    replica = sample.labels.get("replica")
                    mine = index == newest[replica] if replica in newest else index == 0
                    if mine:
                        series[key] = sample.value
                elif key not in series:
                    series[key] = sample.value
                elif sample.name.endswith("_created"):
                    series[key] = min(series[key], sample.value)
                else:
                    series[key] = series[key] + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    replicas = Metric("sessionserve_ingress_replicas", "ingress replicas whose numbers this answer adds up", "gauge")
    replicas.add_sample("sessionserve_ingress_replicas", {}, len(snapshots))
    return [*merged.values(), replicas]


def render(snapshots: Sequence[MetricsSnapshot]) -> bytes:
    """Prometheus' text format of every ingress replica's numbers, added up (`merge`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge(snapshots)))  # type: ignore[arg-type]  # a collector is anything with collect()
    return generate_latest(registry)


# The ingress process' metrics. Always reach it as `metrics.METRICS` (module attribute): Ray pickles the FastAPI
# app by value, so a name bound at import time in the ingress module would point at a copy in the replica.
METRICS = Metrics()
