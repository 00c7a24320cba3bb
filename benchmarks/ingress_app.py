"""The ingress' FastAPI app alone, driven as ASGI in this process (no Ray, no uvicorn, no HTTP): CPU per request.

`benchmarks/control_plane.py` measures the whole path on a machine shared with its client; this isolates what the
app itself costs per route (FastAPI's routing, dependencies and validation, the route's work, its store calls), so
that a change to it can be measured without the machine's noise. The ingress instance is built without its Ray
constructor (its history API over the chosen store, no model deployment: nothing here reaches a model) and handed to
the routes the way Ray Serve's class-based view does (`serve.get_replica_context().servable_object`).

    .venv/bin/python -m benchmarks.ingress_app --store postgresql --concurrent 16 --out ingress-app.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import types
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
ROUTES = ("health", "models", "create", "info", "history", "append", "delete")
MESSAGE = {"role": "user", "content": "a note appended without generating"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite", help="sqlite, postgresql, redis, or a store URL")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per route")
    parser.add_argument("--concurrent", type=int, default=16, help="requests in flight at once")
    parser.add_argument(
        "--threads",
        action="store_true",
        help="a network store's calls in worker threads, as before loop_io (to compare with the default)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _ingress(store_url: str, stack: ExitStack, threads: bool) -> Any:
    """The app's Ingress, its history API over `store_url`, as Ray would hand it to the routes (until `stack` ends)."""
    from ray import serve

    from serving.config import load_config
    from serving.server import ingress
    from serving.server.control_plane import ingress_history

    config = load_config(
        None, {"model": {"name": "builtin:tiny-random-llama"}, "sessions": {"store": store_url, "max_sessions": 10**7}}
    )
    routes_class = next(c for c in ingress.Ingress.func_or_class.__mro__ if c.__name__ == "Ingress")

    class Bench(routes_class):  # type: ignore[misc, valid-type]
        def __del__(self) -> None:
            """Nothing to stop: no model in this process (the class' own is a coroutine for Ray to await)."""

    instance = object.__new__(Bench)  # not its constructor: that one needs a Ray replica
    instance.draining, instance._in_flight, instance._local = False, set(), None
    instance.model_name = config.model.name
    instance.history, instance._replica_kv = ingress_history(config, None)  # type: ignore[arg-type]
    if threads:
        instance.history.manager.store.runs_on_loop = False  # SessionManager.store_call then picks a worker thread
    real = serve.get_replica_context
    serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=instance)  # what the routes' self is
    stack.callback(setattr, serve, "get_replica_context", real)
    stack.callback(instance.history.manager.store.close)
    return ingress.app


async def _call(app: Any, method: str, path: str, body: dict[str, Any] | None = None, query: bytes = b"") -> None:
    data = json.dumps(body).encode() if body is not None else b""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    received = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if not status or status[0] >= 300:
        raise RuntimeError(f"{method} {path}: {status}")


async def _measure(app: Any, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(300)]
    history = {"messages": [MESSAGE, {"role": "assistant", "content": "noted"}] * 2}
    for session_id in ids:
        await _call(app, "POST", "/v1/sessions", {"session_id": session_id, **history})
    routes: dict[str, Callable[[int], Awaitable[None]]] = {
        "health": lambda i: _call(app, "GET", "/health"),
        "models": lambda i: _call(app, "GET", "/v1/models"),
        "create": lambda i: _call(app, "POST", "/v1/sessions", {"session_id": f"{run}-new-{i}"}),
        "info": lambda i: _call(app, "GET", f"/v1/sessions/{ids[i % len(ids)]}"),
        "history": lambda i: _call(app, "GET", f"/v1/sessions/{ids[i % len(ids)]}/messages", query=b"window=8"),
        "append": lambda i: _call(app, "POST", f"/v1/sessions/{ids[i % len(ids)]}/messages", {"messages": [MESSAGE]}),
        "delete": lambda i: _call(app, "DELETE", f"/v1/sessions/{run}-new-{i}"),  # what create made
    }
    results = {}
    for name, route in routes.items():
        offset = 10**6 if name in ("create", "delete") else 0  # warm-up: its own sessions
        await asyncio.gather(*(route(offset + i) for i in range(args.concurrent)))
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, args.requests, args.concurrent):
            await asyncio.gather(*(route(i) for i in range(start, min(start + args.concurrent, args.requests))))
        results[name] = {
            "cpu_ms": round(1000 * (time.process_time() - cpu) / args.requests, 3),
            "wall_ms": round(1000 * (time.perf_counter() - wall) / args.requests, 3),
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from benchmarks.control_plane import _store_url

    with ExitStack() as stack:
        app = _ingress(_store_url(args.store, stack), stack, args.threads)
        results = uvloop.run(_measure(app, args))
    calls = "worker threads" if args.threads else "store_call's choice"
    table = Table(title=f"the ingress app alone ({args.store}, {args.concurrent} in flight, {calls}): per request")
    for column in ("route", "CPU ms", "wall ms"):
        table.add_column(column, justify="right")
    for name, numbers in results.items():
        table.add_row(name, f"{numbers['cpu_ms']:.3f}", f"{numbers['wall_ms']:.3f}")
    console.print(table)
    config = {"store": args.store, "requests": args.requests, "concurrent": args.concurrent, "threads": args.threads}
    report = {"config": config, **results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
