"""`sessionserve serve`'s lifecycle: "ready" only when /ready says so, and a graceful stop on SIGTERM or SIGINT.

Stopping drains first (the ingress refuses new turns with 503 + Retry-After, lets running turns finish within the
grace period and cancels the rest uncommitted; a server never ready kills its replicas that never started instead),
then stops Serve, then leaves Ray (stopping it if we started it), and returns once the HTTP port is closed, so a
supervisor that restarts us never finds the port still taken. Ray's processes that outlive `ray.shutdown()` (its
agents wait on a GCS that is gone before they exit) are stopped by us, so a stopped server leaves nothing running.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NamedTuple, TypeVar

import httpx
import psutil

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class DeployWatch:
    """Deploys without waiting for the replicas, then is polled from the main thread while it waits for the port and
    /ready: a failed deploy is kept and sets the stop event; `check()` says whether every replica of the app runs.

    `serve.run` would wait until every replica is up, which may be never (a replica no node can place), so it would
    need a thread of its own; but a thread still polling Serve when `ray.shutdown()` runs calls `ray.init()` again
    (Ray's auto-connect) and the finished core worker ends the whole process with status 1. Here nothing touches Ray
    outside the main thread and the bounded stop steps."""

    def __init__(self, deploy: Callable[[], object], status: Callable[[], AppStatus], stop: threading.Event) -> None:
        self.error: str | None = None
        self._deploy, self._status, self._stop = deploy, status, stop

    def start(self) -> DeployWatch:
        try:
            self._deploy()
        except Exception as error:  # the app is refused (a store its processes cannot share) or Serve is down
            self._fail(str(error))
        return self

    def check(self) -> bool:
        """One look at the app's status: whether all its replicas run. Never raises (a GCS hiccup is not a failed
        deploy: the next look decides)."""
        if self.error is not None:
            return False
        try:
            status = self._status()
        except Exception:
            log.debug("deploy status poll failed", exc_info=True)
            return False
        if status.failure:
            self._fail(status.failure)
        return status.running

    def _fail(self, message: str) -> None:
        self.error = message
        self._stop.set()


def deploy_app(app: object, app_name: str) -> None:
    """Hand the app to Serve's controller and return at once (see DeployWatch)."""
    from ray import serve

    serve.run_many(
        [serve.RunTarget(target=app, name=app_name, route_prefix="/")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


class AppStatus(NamedTuple):
    running: bool  # every replica of every deployment runs (an ingress replica may be up before its siblings)
    failure: str | None  # Serve's message when the deploy failed (a replica's constructor raised)


def app_status(app_name: str) -> AppStatus:
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is not None and status.status == "DEPLOY_FAILED":
        return AppStatus(False, f"deploying {app_name} failed: {status.message}")
    return AppStatus(status is not None and status.status == "RUNNING", None)


def wait_ready(
    url: str,
    stop: threading.Event,
    timeout_s: float | None = None,
    interval_s: float = 0.5,
    check: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll until `check()` holds and GET {url}/ready answers 200; False if asked to stop (or timed out) first.
    `check` runs before every poll (the deploy's status: it may set `stop`)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        deployed = check()
        if stop.is_set():
            break
        try:
            if deployed and httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(interval_s)
    return False


def drain(app_name: str, grace_s: float) -> dict[str, int]:
    """Every ingress replica refuses new turns and waits up to grace_s for its running ones, all at once;
    {"cancelled": N, "replicas": R}: the turns they cut, and how many replicas drained."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    # A broadcast goes to the replicas the handle knows of; a routed call first waits until it knows them.
    handle.metrics_snapshot.remote().result(timeout_s=30)
    reports = handle.broadcast("drain", grace_s).results(timeout_s=grace_s + 30)
    return {"cancelled": sum(report["cancelled"] for report in reports), "replicas": len(reports)}


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


def bounded(
    step: str, call: Callable[[], T], timeout_s: float, meanwhile: Callable[[], object] | None = None
) -> T | None:
    """Run `call` in a daemon thread for at most timeout_s; log a failure or overrun and go on. A cluster that lost
    its raylet (a SIGTERM sent to our whole process group reaches Ray's own processes) must not keep us alive.
    `meanwhile` runs again and again (its errors ignored) until `call` ends."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name=f"sessionserve-{step}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while meanwhile is not None and thread.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            meanwhile()
        thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        log.warning("%s did not finish within %.0f s; going on", step, timeout_s)
    elif errors:
        log.warning("%s failed: %s", step, errors[0])
    return result[0] if result else None


def shutdown(app_name: str, grace_s: float | None, *, started_ray: bool, host: str, port: int) -> None:
    """Drain (unless grace_s is None: never ready, so no turn ran), stop Serve, leave Ray (stopping it when it is
    ours), and wait for the port to close. Never raises.

    A joined cluster is left with `ray.shutdown()` too (it only disconnects this driver): left to Ray's exit hook,
    the disconnect races the threads Serve started here (the drain's handle polls the controller), and a poll that
    meets the finished worker ends the process with status 1."""
    import ray
    from ray import serve

    report = None if grace_s is None else bounded("drain", lambda: drain(app_name, grace_s), grace_s + 40)
    if report and report.get("cancelled"):
        log.warning("cancelled %d running turn(s) after %.1f s; none was committed", report["cancelled"], grace_s)
    # Never ready: replicas that never started are killed while Serve stops the app (it would wait on each).
    unstarted = (lambda: stop_unstarted_replicas(app_name)) if grace_s is None else None
    bounded("serve shutdown", serve.shutdown, 60, meanwhile=unstarted)
    ours = psutil.Process().children(recursive=True) if started_ray else []  # the local cluster's processes
    bounded("ray shutdown", ray.shutdown, 60)
    reap(ours)
    if not wait_port_closed(host, port):
        log.warning("port %s:%d still open after shutdown", host, port)


def stop_unstarted_replicas(app_name: str, wait_s: float = 1.0) -> int:
    """Kill this app's replica actors that do not answer within wait_s (not placed, or still loading): stopping the
    app, Serve would wait out each one's graceful-stop time (45 s for a model replica, for its KV write) for a stop
    call that cannot run before the actor starts, and a supervisor's grace (Kubernetes: 30 s) ends sooner. Called
    only while stopping a server that was never ready (such a replica has served nothing), and again until Serve is
    down: one killed before the controller began stopping the app is replaced. Returns how many were killed."""
    import ray

    from serving.server.direct_ingress import REPLICA_ACTOR_PREFIX

    prefix = f"{REPLICA_ACTOR_PREFIX}{app_name}#"
    actors = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            with contextlib.suppress(ValueError):  # gone meanwhile
                actors.append(ray.get_actor(entry["name"], namespace=entry["namespace"]))
    pings = {actor.__ray_ready__.remote(): actor for actor in actors}
    ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=wait_s) if pings else ([], [])
    unstarted = [actor for ref, actor in pings.items() if ref not in ready]
    for actor in unstarted:
        ray.kill(actor, no_restart=True)
    if unstarted:
        log.info("stopped %d replica(s) that never started", len(unstarted))
    return len(unstarted)


def reap(processes: list[psutil.Process], grace_s: float = 10, kill_after_s: float = 5) -> int:
    """Wait up to grace_s for `processes` to exit, then SIGTERM and finally SIGKILL the rest; returns how many had
    to be stopped. Ray's dashboard and runtime-env agents notice their raylet is gone only after a few polls and then
    retry a dead GCS; on a loaded node that outlasts any supervisor's patience."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=kill_after_s)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=kill_after_s)
    if alive:
        log.info("stopped %d Ray process(es) still running after ray.shutdown()", len(alive))
    return len(alive)
