"""`sessionserve serve`'s lifecycle: "ready" only when /ready says so, and a graceful stop on SIGTERM or SIGINT.

Stopping drains first (the ingress refuses new turns with 503 + Retry-After, lets running turns finish within the
grace period and cancels the rest uncommitted), then stops Serve, then Ray if we started it, and returns once the
HTTP port is closed, so a supervisor that restarts us never finds the port still taken.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import FrameType

import httpx

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM and SIGINT set an event instead of raising, so the main thread decides when and how to stop.

    Installed after `ray.init`, whose own SIGTERM handler would `sys.exit` in the middle of whatever runs.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None

    def install(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        self.event.set()


def wait_ready(url: str, stop: threading.Event, timeout_s: float | None = None, interval_s: float = 0.5) -> bool:
    """Poll GET {url}/ready until it answers 200; False if asked to stop (or timed out) first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        try:
            if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(interval_s)
    return False


def drain(app_name: str, grace_s: float) -> dict[str, int]:
    """The ingress refuses new turns and waits up to grace_s for running ones; {"cancelled": N} is what it cut."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    return handle.drain.remote(grace_s).result(timeout_s=grace_s + 30)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)) == 0


def wait_port_closed(host: str, port: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while port_open(host, port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def shutdown(app_name: str, grace_s: float, *, started_ray: bool, host: str, port: int) -> None:
    """Drain, stop Serve, stop Ray when it is ours, and wait for the port to close. Never raises."""
    import ray
    from ray import serve

    try:
        cancelled = drain(app_name, grace_s).get("cancelled", 0)
        if cancelled:
            log.warning(
                "cancelled %d turn(s) still running after %.1f s; none of them was committed", cancelled, grace_s
            )
    except Exception as error:  # the app may not be up yet (a signal during start-up): stop anyway
        log.warning("drain skipped: %s", error)
    try:
        serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
    if not wait_port_closed(host, port):
        log.warning("port %s:%d still open after shutdown", host, port)
