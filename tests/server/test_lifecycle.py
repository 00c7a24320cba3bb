"""serving.server.lifecycle without Ray: signals become an event, every stop step is bounded, deploy failures kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

from serving.server.lifecycle import AppStatus, DeployWatch, StopSignal, bounded, reap, wait_port_closed, wait_ready


def test_sigterm_and_sigint_set_the_stop_event_instead_of_exiting():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopSignal().install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.wait(5) and stop.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing: the first one is what we act on
        time.sleep(0.1)
        assert stop.received == signal.SIGTERM
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_bounded_gives_up_on_a_hung_step_and_reports_a_failed_one(caplog):
    started = time.monotonic()
    assert bounded("hung", lambda: threading.Event().wait(30), timeout_s=0.2) is None
    assert time.monotonic() - started < 5
    assert bounded("fine", lambda: 42, timeout_s=5) == 42

    def fail() -> None:
        raise RuntimeError("boom")

    assert bounded("broken", fail, timeout_s=5) is None
    assert "hung did not finish" in caplog.text and "broken failed: boom" in caplog.text


def test_bounded_runs_meanwhile_until_the_step_ends_and_ignores_its_errors():
    finished, calls = threading.Event(), []

    def meanwhile() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            finished.set()  # the step ends once meanwhile has run three times
        raise RuntimeError("ignored")

    assert bounded("step", lambda: finished.wait(10) and 7, timeout_s=10, meanwhile=meanwhile) == 7
    assert len(calls) == 3


def test_wait_ready_returns_false_once_asked_to_stop():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert wait_ready("http://127.0.0.1:9", stop, interval_s=0.05) is False  # nothing listens on port 9
    assert time.monotonic() - started < 5


class AlwaysReady(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_ready_waits_until_every_replica_of_the_app_runs_not_only_the_one_that_answers():
    server = ThreadingHTTPServer(("127.0.0.1", 0), AlwaysReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    looks: list[int] = []

    def deployed() -> bool:  # a second ingress replica is still starting for the first two looks
        looks.append(1)
        return len(looks) >= 3

    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert wait_ready(url, threading.Event(), timeout_s=10, interval_s=0.05, check=deployed) is True
        assert len(looks) == 3
    finally:
        server.shutdown()


def test_a_refused_deploy_stops_the_server_at_once():
    stop = threading.Event()

    def refuse() -> None:
        raise ValueError("memory:// is refused")

    watch = DeployWatch(refuse, lambda: AppStatus(False, None), stop).start()
    assert stop.is_set() and watch.error == "memory:// is refused"


def test_a_deploy_that_fails_later_ends_the_wait_for_ready_and_a_status_hiccup_does_not():
    stop, looks = threading.Event(), []

    def failure() -> AppStatus:
        looks.append(1)
        if len(looks) == 1:
            raise ConnectionError("GCS hiccup")  # not a failed deploy: the next look decides
        return AppStatus(False, "deploying sessionserve failed: boom" if len(looks) == 3 else None)

    watch = DeployWatch(lambda: None, failure, stop).start()
    assert not stop.is_set()
    started = time.monotonic()
    assert wait_ready("http://127.0.0.1:9", stop, interval_s=0.05, check=watch.check) is False
    assert time.monotonic() - started < 5
    assert watch.error == "deploying sessionserve failed: boom" and len(looks) == 3
    watch.check()  # a failure is kept, not looked up again
    assert len(looks) == 3


def test_wait_port_closed_is_true_for_a_closed_port():
    assert wait_port_closed("127.0.0.1", 9, timeout_s=1)


def test_reap_waits_for_processes_that_exit_and_stops_those_that_ignore_sigterm():
    exits = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    )
    time.sleep(0.5)  # the second one has installed its handler
    started = time.monotonic()
    processes = [psutil.Process(exits.pid), psutil.Process(stubborn.pid)]
    assert reap(processes, grace_s=1, kill_after_s=1) == 1
    assert [process.returncode for process in processes] == [0, -signal.SIGKILL]  # psutil reaped them, not Popen
    assert time.monotonic() - started < 10
