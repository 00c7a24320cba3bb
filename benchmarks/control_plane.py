"""Session operations through the real HTTP path, next to `/health` in the same run.

Deploys the Ray Serve app (one model replica, the tiny random model: no operation measured here runs the model) on
loopback with the chosen store, fills it with `--sessions` sessions, then `--clients` concurrent clients run each
operation for `--seconds`: create, info, history read, append, delete, and `/health` (which never leaves the
ingress), in `--rounds` turns (every operation once per round), so that what else the machine does meanwhile
weighs on every operation alike. Reports ops/s and p50/p90 ms per operation and each operation's throughput
relative to `/health`, and the CPU milliseconds each operation cost each process serving it (this process is the
client; then the ingress, the model replica, Ray's proxy, the store's server, and the rest of the machine): on one
small machine they all share the same cores, so the ratio depends on who else is busy, while CPU per operation does
not.

    .venv/bin/python -m benchmarks.control_plane --store sqlite --out results-control-plane.json
    .venv/bin/python -m benchmarks.control_plane --store sqlite --ingress proxy  # via Ray's proxy (serving.ingress)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from serving.server import cluster, direct_ingress, lifecycle
from serving.server.direct_ingress import IngressMode

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # logs: no wrapped table
TARGET_RATIO = 0.8  # session operations run at >= 0.8x the throughput of /health
MESSAGE = {"role": "user", "content": "a note appended without generating"}
OPERATIONS = ("health", "create", "info", "history", "append", "delete")  # delete removes what create made
# Who spent the machine's CPU during each operation's run, by a process's title (Ray names its actors' processes).
ROLES = {
    "ingress": ("ray::ServeReplica:control-plane:Ingress",),
    "model replica": ("ray::ServeReplica:control-plane:LLMServer",),
    "proxy": ("ray::ProxyActor", "ray::HAProxyManager", "haproxy"),  # HAProxy's process is named by its binary
    "store": ("postgres", "redis-server"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite", help="sqlite, postgresql, redis, or a store URL")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions in the store before timing")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per operation, all rounds together")
    parser.add_argument(
        "--rounds", type=int, default=3, help="run the operations in turn this many times (noise falls on all alike)"
    )
    parser.add_argument(
        "--operations", default=",".join(OPERATIONS), help=f"comma-separated subset of {','.join(OPERATIONS)}"
    )
    parser.add_argument(
        "--ingress",
        choices=("proxy", "direct", "replica", "haproxy"),
        default="direct",
        help="direct (what `serve` runs on a Ray it starts): the ingress replica serves HTTP; proxy: through Ray "
        "Serve's HTTP proxy; replica: the model replica serves HTTP; haproxy: HAProxy in front of the ingress "
        "replica (serving.ingress)",
    )
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, help="ingress replicas (serving.ingress_replicas; haproxy or proxy)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.operations = args.operations.split(",")
    if set(args.operations) - set(OPERATIONS) or "health" not in args.operations:
        parser.error(f"--operations: a subset of {','.join(OPERATIONS)} that includes health")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if "delete" in args.operations and "create" not in args.operations:
        parser.error("--operations: delete removes what create made, so it needs create")
    return args


def _store_url(kind: str, stack: ExitStack) -> str:
    if "://" in kind:
        return kind
    if kind == "sqlite":
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-control-")))
        return f"sqlite:///{root / 'sessions.db'}"
    from tests.servers import start_postgres, start_redis

    server = start_postgres(durable=True) if kind == "postgresql" else start_redis()
    stack.callback(server.close)
    return server.url


def _deploy(store: str, ingress: IngressMode, ingress_replicas: int, stack: ExitStack) -> str:
    from tests.servers import free_port

    port = free_port()
    problem = direct_ingress.prepare_local_ray(ingress, "127.0.0.1", port)  # before Ray starts, as `serve` does
    if problem:
        raise RuntimeError(problem)

    import ray
    from ray import serve

    from serving.config import load_config
    from serving.server.builder import build_app

    cluster.start_local(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    stack.callback(ray.shutdown)
    serve.start(http_options=direct_ingress.http_options(ingress, "127.0.0.1", port))
    stack.callback(serve.shutdown)
    config = load_config(
        None,
        {
            "model": {"name": "builtin:tiny-random-llama", "device": "cpu", "dtype": "float32", "torch_threads": 1},
            "engine": {"kv_cache_memory": "64MiB", "host_cache_memory": "0"},
            "sessions": {"store": store, "max_sessions": 10**6},
            "serving": {"cpus_per_replica": 0.5, "ingress": ingress, "ingress_replicas": ingress_replicas},
        },
    )
    serve.run(build_app(config), name="control-plane", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    if not lifecycle.wait_ready(url, threading.Event(), timeout_s=180):
        raise TimeoutError("the app did not become ready")
    return url


async def _measure(
    clients: int,
    seconds: float,
    operation: Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]],
    url: str,
    most: int | None = None,
) -> tuple[list[float], float]:
    """`clients` loops calling `operation` (numbered 0, 1, ...; at most `most` calls) until `seconds` pass; every
    call must succeed. Returns each call's latency and the wall time, in seconds."""
    latencies: list[float] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop_at:
                number = next(counter)
                if most is not None and number >= most:
                    return
                started = time.perf_counter()
                response = await operation(http, number)
                if response.status_code >= 300:
                    raise RuntimeError(f"{response.request.method} {response.request.url}: {response.status_code}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies, time.perf_counter() - started


def _summary(latencies: list[float], wall: float) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "ops": len(ms),
        "ops_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2),
    }


def _role(process: psutil.Process) -> str | None:
    if process.pid == os.getpid():
        return "client"
    try:  # Ray titles its actors' processes; a server's title may be its path (/usr/bin/redis-server), its name not
        names = (" ".join(process.cmdline()), process.name())
    except psutil.Error:
        return None
    return next((role for role, prefixes in ROLES.items() if any(n.startswith(prefixes) for n in names)), None)


def _cpu_seconds() -> tuple[float, dict[int, tuple[str, float]]]:
    """The machine's busy CPU seconds so far, and each role's processes' CPU seconds (this process is the client)."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    processes: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter():
        role = _role(process)
        if role is not None:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                processes[process.pid] = (role, times.user + times.system)
    return busy, processes


def _cpu_spent(before: tuple[float, dict[int, tuple[str, float]]]) -> dict[str, float]:
    """CPU seconds since `before`, by role, and the rest of the machine (Ray's own processes, the kernel)."""
    busy, processes = _cpu_seconds()
    spent = dict.fromkeys(["client", *ROLES], 0.0)
    for pid, (role, seconds) in processes.items():
        spent[role] += seconds - before[1].get(pid, (role, 0.0))[1]  # a process started since counts from zero
    spent["rest"] = busy - before[0] - sum(spent.values())
    return spent


def _ms_per_op(spent: dict[str, float], ops: int) -> dict[str, float]:
    return {role: round(1000 * seconds / max(ops, 1), 3) for role, seconds in spent.items()}


def _cpu_vs_health(results: dict[str, Any]) -> dict[str, float]:
    """Each operation's CPU ratio to `/health`: the ops/s ratio the machine's cores would allow if every process on
    it (the client included) were CPU-bound. Where ops/s fall short of the target with this below it too, the run
    measured how the operations share this machine's cores, not a wait in the server."""
    spent = {name: sum(result["cpu_ms_per_op"].values()) for name, result in results.items()}
    return {name: round(spent["health"] / max(ms, 1e-9), 2) for name, ms in spent.items()}


def _operations(ids: list[str], run: str) -> dict[str, Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]]:
    """Each operation's call number i; `run` names what create makes (and delete removes) in one round."""

    def pick(i: int) -> str:
        return ids[i % len(ids)]

    return {
        "health": lambda http, i: http.get("/health"),
        "create": lambda http, i: http.post("/v1/sessions", json={"session_id": f"{run}-new-{i}"}),
        "info": lambda http, i: http.get(f"/v1/sessions/{pick(i)}"),
        "history": lambda http, i: http.get(f"/v1/sessions/{pick(i)}/messages", params={"window": 8}),
        "append": lambda http, i: http.post(f"/v1/sessions/{pick(i)}/messages", json={"messages": [MESSAGE]}),
        "delete": lambda http, i: http.delete(f"/v1/sessions/{run}-new-{i}"),
    }


async def _run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every operation in turn, `--rounds` times over (seconds / rounds each time), so that what else the machine
    does meanwhile falls on every operation alike; each operation's numbers are its rounds' together."""
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(args.sessions)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for chunk in range(0, len(ids), 64):
            batch = ids[chunk : chunk + 64]
            body = {"messages": [MESSAGE, {"role": "assistant", "content": "noted"}] * 2}
            await asyncio.gather(*(http.post("/v1/sessions", json={"session_id": sid, **body}) for sid in batch))
    names = [name for name in OPERATIONS if name in args.operations]
    latencies: dict[str, list[float]] = {name: [] for name in names}
    wall = dict.fromkeys(names, 0.0)
    cpu: dict[str, dict[str, float]] = {name: {} for name in names}  # CPU seconds by role
    seconds = args.seconds / args.rounds
    for round_number in range(args.rounds):
        created = 0
        for name, operation in _operations(ids, f"{run}r{round_number}").items():
            if name not in names:
                continue
            console.print(f"round {round_number + 1}/{args.rounds}: timing {name} for {seconds:g} s")
            cpu_before = _cpu_seconds()
            most = created if name == "delete" else None  # delete removes what create made this round
            taken, elapsed = await _measure(args.clients, seconds, operation, url, most)
            created = len(taken) if name == "create" else created
            for role, spent in _cpu_spent(cpu_before).items():
                cpu[name][role] = cpu[name].get(role, 0.0) + spent
            latencies[name] += taken
            wall[name] += elapsed
    results: dict[str, Any] = {}
    for name in names:
        results[name] = _summary(latencies[name], wall[name])
        results[name]["cpu_ms_per_op"] = _ms_per_op(cpu[name], results[name]["ops"])
        console.print(f"{name}: {results[name]}")
    health = results["health"]["ops_per_s"]
    for name, cpu_ratio in _cpu_vs_health(results).items():
        results[name]["vs_health"] = round(results[name]["ops_per_s"] / health, 2)
        results[name]["cpu_vs_health"] = cpu_ratio
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        store = _store_url(args.store, stack)
        url = _deploy(store, args.ingress, args.ingress_replicas, stack)
        results = asyncio.run(_run(url, args))
    table = Table(title=f"session operations vs /health ({args.clients} clients, {args.sessions} sessions)")
    columns = [
        "operation",
        "ops/s",
        "p50 ms",
        "p90 ms",
        "vs /health",
        "CPU vs /health",
        "CPU ms/op: client",
        "ingress",
        "store",
    ]
    for column in columns:
        table.add_column(column)
    for name, result in results.items():
        cpu = result["cpu_ms_per_op"]
        row = (result["ops_per_s"], result["p50_ms"], result["p90_ms"], result["vs_health"], result["cpu_vs_health"])
        table.add_row(name, *map(str, row), *(f"{cpu[role]:.2f}" for role in ("client", "ingress", "store")))
    console.print(table)
    worst = min(result["vs_health"] for name, result in results.items() if name != "health")
    document = {
        "config": {
            "store": args.store,
            "ingress": args.ingress,
            "ingress_replicas": args.ingress_replicas,
            "sessions": args.sessions,
            "clients": args.clients,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "ray_worker_niceness": int(os.environ[cluster.WORKER_NICENESS]),  # set by start_local
        },
        "operations": results,
        "target": {"vs_health_at_least": TARGET_RATIO, "worst": worst, "met": worst >= TARGET_RATIO},
    }
    if args.out:
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
