"""Ray Serve's direct ingress (`serving.ingress: direct`, `replica` or `haproxy`): the ingress replica serves HTTP
itself, no proxy hop (with `replica`, that replica also holds the model: no hop at all; with `haproxy`, Ray runs
HAProxy on `serving.port` of each node, in front of the ingress replicas' own ports, in place of its proxy actor).

Ray reads these variables once, when `ray.serve._private.constants` is imported in each process (controller,
replicas), so they must be in the environment of every Ray process: `sessionserve serve` sets them before it starts
its local Ray (whose processes inherit them); a cluster it joins must have been started with them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

IngressMode = Literal["proxy", "direct", "replica", "haproxy"]
IngressSetting = Literal["auto", "proxy", "direct", "replica", "haproxy"]  # auto: see `resolve`
ClusterMode = Literal["proxy", "direct", "haproxy"]  # what a Ray cluster's processes were started for

ENABLE = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
# HAProxy's own listeners on each node besides serving.port (Ray's defaults; set the variables to move them).
HAPROXY_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # a replica's actor name (ray.serve._private.common)


def local_env(ingress: IngressMode, port: int) -> dict[str, str]:
    """The environment of a local Ray serving `ingress` (not proxy) on `port`.

    direct, replica: Ray hands each ingress replica the lowest free port of [MIN, MAX): a range of one port is the
    configured one. Released ports are normally quarantined for HAProxy's sake (~150 s); with no HAProxy in front, a
    replacement replica must get the port back at once. Ray also keeps a stopping ingress replica open for at least
    30 s so that a load balancer can deregister it; our drain already answers 503 + Retry-After, so stopping need not
    wait. haproxy: HAProxy takes `port` (the proxy's, see http_options) and the replicas Ray's own range and
    quarantine; HAProxy on this node drops a stopping replica within a reload (Ray coalesces updates over 0.1 s), so
    2 s of draining is enough, not 30.
    """
    if ingress == "haproxy":
        return {HA_PROXY: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    return {
        ENABLE: "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def resolve(
    setting: IngressSetting, *, joined: ClusterMode | None, env: Mapping[str, str], ingress_replicas: int
) -> IngressMode:
    """What `serving.ingress: auto` means here (another setting means itself).

    Joining a cluster (`joined`: what its processes were started for): that mode, since Ray reads it only as its
    processes start. Starting our own Ray from `env`: a Ray variable already there decides (it would be inherited);
    otherwise direct ingress, Ray's own throughput-optimized default (`RAY_SERVE_THROUGHPUT_OPTIMIZED`): without
    the proxy hop every request costs the server less CPU and time (README, "Direct ingress"), and on a Ray started
    for this server alone nothing else needs the proxy. Several ingress replicas need something in front to spread
    requests over them: the proxy then, unless HAProxy is asked for.
    """
    if setting != "auto":
        return setting
    if joined is not None:
        return joined
    if (inherited := mode_of(env)) != "proxy" or env.get(ENABLE) == "0":  # "0": proxy asked for explicitly
        return inherited
    return "direct" if ingress_replicas == 1 else "proxy"


def serves_directly(ingress: IngressMode) -> bool:
    """Clients reach the app's ingress replica (the model replica itself, with `replica`) on its own port, with
    nothing in front: the port is whatever the cluster gave that replica."""
    return ingress in ("direct", "replica")


def http_options(ingress: IngressMode, host: str, port: int, **options: Any) -> dict[str, Any]:
    """`serve.start`'s http_options. With direct ingress Ray still runs its proxy on the head node (a fallback
    nobody here calls), so it gets any free port and leaves `port` to the ingress replica; with HAProxy, HAProxy
    listens on the proxy's port."""
    return {"host": host, "port": 0 if serves_directly(ingress) else port, **options}


def mode_of(env: Mapping[str, str]) -> ClusterMode:
    """What Ray makes of an environment (HAProxy implies direct ingress, as in Ray's constants)."""
    if env.get(HA_PROXY) == "1":
        return "haproxy"
    return "direct" if env.get(ENABLE) == "1" else "proxy"


def prepare_local_ray(ingress: IngressMode, host: str, port: int) -> str | None:
    """Before `serve` starts its own Ray, whose processes inherit this environment: set direct ingress's variables,
    or say why we cannot serve `ingress` on host:port."""
    from serving.server.lifecycle import port_open

    if problem := environment_conflict(ingress, os.environ):
        return problem
    if ingress == "proxy":
        return None
    if port_open(host, port):
        return f"port {port} on {host} is already in use"
    if ingress == "haproxy":
        for name, default in HAPROXY_PORTS.items():
            other = int(os.environ.get(name, default))
            if port_open("127.0.0.1", other):
                return f"HAProxy's {name} ({other}) is already in use on this machine: set {name} to a free port"
    os.environ.update(local_env(ingress, port))
    return None


def cluster_mode() -> ClusterMode:
    """The mode of the cluster we joined: a zero-CPU task on the head node (where Serve's controller runs) reads
    the variables its Ray processes were started with."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(
        node["NodeID"]
        for node in ray.nodes()
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {})
    )

    @ray.remote(num_cpus=0)
    def read_env() -> dict[str, str]:
        return {name: os.environ.get(name, "") for name in (ENABLE, HA_PROXY)}

    env = ray.get(read_env.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote())
    return mode_of(env)


def mismatch(wanted: IngressMode, cluster: ClusterMode, address: str) -> str | None:
    """Why we cannot serve `wanted` on a cluster started for `cluster`, or None when they agree. A replica serves
    HTTP itself in direct and haproxy clusters alike, so direct and replica run on either."""
    if wanted == "haproxy":
        if cluster == "haproxy":
            return None
        return (
            f"serving.ingress is haproxy but the Ray cluster at {address} was started without {HA_PROXY}=1, and Ray "
            f"reads it only when its processes start: start every node with {HA_PROXY}=1, or use --ingress "
            f"{'proxy' if cluster == 'proxy' else 'direct'}"
        )
    if serves_directly(wanted) == (cluster != "proxy"):
        return None
    if serves_directly(wanted):
        return (
            f"serving.ingress is {wanted} but the Ray cluster at {address} was started without {ENABLE}=1, and Ray "
            f"reads it only when its processes start: start the cluster with {ENABLE}=1 (e.g. "
            f"`{ENABLE}=1 ray start --head`, or an env var on the KubeRay containers), or use --ingress proxy"
        )
    return (
        f"serving.ingress is proxy but the Ray cluster at {address} was started with {ENABLE}=1 (or {HA_PROXY}=1): "
        f"use --ingress {'haproxy' if cluster == 'haproxy' else 'direct'}, or restart the cluster without the variable"
    )


def environment_conflict(ingress: IngressMode, env: Mapping[str, str]) -> str | None:
    """Why a local Ray started from `env` could not serve `ingress`: it would inherit Ray's variables from there."""
    inherited = mode_of(env)
    if ingress == "proxy" and inherited != "proxy":
        return (
            f"serving.ingress is proxy but {ENABLE}=1 (or {HA_PROXY}=1) is set in this environment, and the local Ray "
            f"would inherit it: use --ingress {'haproxy' if inherited == 'haproxy' else 'direct'}, or unset the "
            f"variable"
        )
    if serves_directly(ingress) and inherited == "haproxy":  # HAProxy would take the port the replica is given
        return (
            f"serving.ingress is {ingress} but {HA_PROXY}=1 is set in this environment, and the local Ray would "
            f"inherit it: use --ingress haproxy, or unset the variable"
        )
    return None


def ingress_ports(details: Mapping[str, Any], app_name: str) -> list[int]:
    """The HTTP ports of the app's ingress replicas, from Serve's instance details (`target_groups`). Until a
    replica runs, the app's group lists Ray's proxy instead, whose actor name is not a replica's."""
    return sorted(
        int(target["port"])
        for group in details.get("target_groups", [])
        if group.get("app_name") == app_name and group.get("protocol") == "HTTP"
        for target in group.get("targets", [])
        if str(target.get("name", "")).startswith(REPLICA_ACTOR_PREFIX)
    )


def wait_ingress_port(
    app_name: str, stop: threading.Event, interval_s: float = 0.5, check: Callable[[], object] = lambda: None
) -> int | None:
    """The port the app's ingress replica listens on, once Ray has started it; None if asked to stop first.

    Ray's public API does not say which port it gave a replica; its instance details (the dashboard's
    /api/serve/applications/ schema) list them under `target_groups`.
    """
    from ray.serve.context import _get_global_client

    while not stop.is_set():
        check()  # the deploy's status: it may set `stop`
        if stop.is_set():
            break
        ports = ingress_ports(_get_global_client().get_serve_details(), app_name)
        if ports:
            return ports[0]
        stop.wait(interval_s)
    return None
