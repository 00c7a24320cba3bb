"""The control-plane benchmark's CPU accounting: whose CPU an operation's run cost, per operation."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from benchmarks.control_plane import _cpu_seconds, _cpu_spent, _cpu_vs_health, _ms_per_op, _role


def _spin(seconds: float) -> None:
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


def test_this_process_is_the_client_and_its_cpu_is_counted_per_operation():
    before = _cpu_seconds()
    _spin(0.3)
    cpu = _ms_per_op(_cpu_spent(before), ops=100)
    assert 2.5 <= cpu["client"] <= 6  # 300 ms over 100 operations, give or take the test's own overhead
    assert set(cpu) == {"client", "ingress", "model replica", "proxy", "store", "rest"}
    assert cpu["ingress"] == 0  # no Ray here ("store" is not: the other pytest worker's servers may be busy)


def test_the_cpu_ratio_counts_every_process_an_operation_cost():
    results = {
        "health": {"cpu_ms_per_op": {"client": 2.0, "ingress": 0.8, "store": 0.0, "rest": 0.2}},  # 3.0 ms
        "append": {"cpu_ms_per_op": {"client": 2.0, "ingress": 1.6, "store": 0.4, "rest": 0.2}},  # 4.2 ms
    }
    assert _cpu_vs_health(results) == {"health": 1.0, "append": 0.71}


@pytest.mark.parametrize(
    ("title", "role"),
    [
        ("ray::ServeReplica:control-plane:Ingress", "ingress"),  # how Ray titles a replica's process
        ("ray::ServeReplica:control-plane:LLMServer", "model replica"),
        ("postgres: sessionserve postgres 127.0.0.1(5432) idle", "store"),  # a PostgreSQL backend
        ("sleep", None),  # anything else is counted in "rest"
    ],
)
def test_a_process_is_told_by_its_title(title, role):
    assert _role(psutil.Process()) == "client"
    child = subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 30'])
    try:
        deadline = time.monotonic() + 5
        while psutil.Process(child.pid).cmdline()[:1] != [title] and time.monotonic() < deadline:
            time.sleep(0.01)  # until bash has exec'd
        assert _role(psutil.Process(child.pid)) == role
    finally:
        child.kill()
        child.wait()
