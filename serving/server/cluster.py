"""The Ray cluster under `sessionserve serve`: join one or start one, and keep a node-local store on one node.

SQLite (and memory) history lives on the machine that opened it. Replicas on a second node would open their own
empty file and lose sessions on failover, so a cluster of several alive nodes needs a network store.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

LOCAL_STORE_SCHEMES = ("sqlite://", "memory://")
NETWORK_STORES = "postgresql://USER:PASSWORD@HOST:5432/DB or redis://HOST:6379/0"

Node = Mapping[str, Any]  # one entry of ray.nodes()
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's variable for its workers' niceness (Ray's default: 15)


@dataclass(frozen=True)
class StoreCheck:
    """What to do about the history store on this cluster: go on, warn, or refuse to start."""

    level: Literal["ok", "warning", "error"]
    message: str = ""


def is_local_store(store_url: str) -> bool:
    return store_url.startswith(LOCAL_STORE_SCHEMES)


def alive_node_ids(nodes: Sequence[Node]) -> list[str]:
    return [str(node.get("NodeID", "")) for node in nodes if node.get("Alive")]


def check_store(nodes: Sequence[Node], store_url: str, *, starting: bool) -> StoreCheck:
    """A local store on more than one alive node: an error at start, a warning once serving (a node joined later)."""
    alive = len(alive_node_ids(nodes))
    if alive <= 1 or not is_local_store(store_url):
        return StoreCheck("ok")
    scheme = store_url.split("://", 1)[0]
    problem = (
        f"the history store is {scheme}:// (local to one machine) but the Ray cluster has {alive} alive nodes: "
        f"replicas on other nodes would not see its sessions. Use a network store, "
        f"sessions.store: {NETWORK_STORES}."
    )
    if starting:
        return StoreCheck("error", f"refusing to start: {problem}")
    return StoreCheck("warning", f"a node joined while serving: {problem}")


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local Ray. True when we started it."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, ignore_reinit_error=True)
        return False
    start_local(ignore_reinit_error=True, include_dashboard=False)
    return True


def start_local(**init_options: Any) -> None:
    """Start a Ray on this machine for serving (`serve`, and the benchmarks that measure what it runs).

    Ray starts its workers at niceness 15, so on a shared machine the ingress and model replicas would yield the CPU
    to everything else (a store's server, a client, Ray's own daemons); the server is this machine's main work.
    """
    import ray

    os.environ.setdefault(WORKER_NICENESS, "0")  # read by the raylet that ray.init starts
    ray.init(address="local", **init_options)


def current_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


class NodeWatch:
    """Polls the cluster's nodes while serving with a local store and logs a warning when a second node joins."""

    def __init__(
        self,
        store_url: str,
        interval_s: float = 5.0,
        nodes: Callable[[], Sequence[Node]] = current_nodes,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self._store_url, self._interval_s, self._nodes, self._warn = store_url, interval_s, nodes, warn
        self._stop = threading.Event()
        self._warned_for: frozenset[str] = frozenset()
        self._thread = threading.Thread(target=self._run, name="sessionserve-node-watch", daemon=True)

    def start(self) -> NodeWatch:
        if is_local_store(self._store_url):
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 1)

    def poll(self) -> StoreCheck:
        """One look at the cluster; warns once per new set of alive nodes, not on every poll."""
        nodes = self._nodes()
        check = check_store(nodes, self._store_url, starting=False)
        alive = frozenset(alive_node_ids(nodes))
        if check.level == "warning" and alive != self._warned_for:
            self._warned_for = alive
            self._warn(check.message)
        return check

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll()
            except Exception:  # a GCS hiccup must not end serving; the next poll tries again
                log.debug("node watch poll failed", exc_info=True)
