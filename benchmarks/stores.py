"""History store latency on loopback: what each backend adds to a turn.

For memory, sqlite, postgresql and redis: append calls per second (a turn's two messages each), window reads per
second (window=8 on a 40-message session), and the store operations one turn does (load the record and the
messages appended since the previous turn's read, as the manager's held history asks, taking the turn's lease; commit
the turn's append giving it back) as p50/p90 ms, with memory's time subtracted as the "store share"; the same for a
turn that reads the whole history (a session's first turn on a replica: "whole history", alternating with the
others); and the append route's store call (the owner check with the append, one call) as p50 ms. PostgreSQL
and Redis are started for the run (tests/servers.py; PostgreSQL with its default durable settings) unless URLs are
given. One thread, one store object per backend, as a replica uses it.

Then, as the server calls a store from its event loop (uvloop, as in Ray's replicas), `--concurrent` callers at once
loading a session's record and last 8 messages: this process' CPU ms per load and the wall time per load, through a
worker thread each (`asyncio.to_thread`) and, for the stores that can, on the loop with the driver's asyncio twin
(`loop_io.run`, what `SessionManager.store_call` picks for them).

    .venv/bin/python -m benchmarks.stores --out results-stores.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.table import Table

from sessions.held import HeldHistories
from sessions.messages import Message
from sessions.store import loop_io, open_store
from sessions.store.base import HistoryStore, Lease, SessionRecord

console = Console(stderr=True)
BACKENDS = ("memory", "sqlite", "postgresql", "redis")
TARGET_MS = {"sqlite": 2.0, "postgresql": 2.0, "redis": 1.0}  # p50 store share of a turn
TURN = [Message("user", "What is the capital of France? " * 4), Message("assistant", "Paris. " * 20)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS)
    )
    parser.add_argument("--postgres-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--turns", type=int, default=400, help="timed turns (and reads, appends) per backend")
    parser.add_argument("--concurrent", type=int, default=16, help="callers at once in the event-loop measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.turns < 40:
        parser.error("--turns must be at least 40: two rounds of the 20 sessions (one reads whole histories)")
    return args


@contextmanager
def store_urls(args: argparse.Namespace, backends: list[str]) -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-stores-")))
        urls = {"memory": "memory://", "sqlite": f"sqlite:///{root / 'sessions.db'}"}
        if "postgresql" in backends:
            urls["postgresql"] = args.postgres_url or _started(stack, "postgres")
        if "redis" in backends:
            base = args.redis_url or _started(stack, "redis")
            urls["redis"] = f"{base}{'&' if '?' in base else '?'}prefix=bench-{uuid.uuid4().hex[:8]}:"
        yield urls


def _started(stack: ExitStack, kind: str) -> str:
    from tests.servers import start_postgres, start_redis

    server = start_postgres(durable=True) if kind == "postgres" else start_redis()
    stack.callback(server.close)
    return server.url


def _timed(n: int, call: Callable[[int], object]) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - started)
    return times


def from_a_loop(store: HistoryStore, ids: list[str], calls: int, concurrent: int) -> dict[str, float]:
    """CPU ms (this process) and wall ms per load(window=8) from an event loop, `concurrent` at a time, by each way
    a loop can call the store: a worker thread each, and (a store that `runs_on_loop`) on the loop itself."""

    async def run() -> dict[str, float]:
        ways: dict[str, Callable[[str], Any]] = {"thread": lambda sid: asyncio.to_thread(store.load, sid, 8)}
        if store.runs_on_loop:
            ways["loop"] = lambda sid: loop_io.run(store.load, sid, 8)
        numbers: dict[str, float] = {}
        for way, load in ways.items():
            for _ in range(20):  # warm-up: connection pools grown, statements prepared, threads started
                await asyncio.gather(*(load(ids[i % len(ids)]) for i in range(concurrent)))
            cpu, wall = time.process_time(), time.perf_counter()
            for start in range(0, calls, concurrent):
                await asyncio.gather(*(load(ids[i % len(ids)]) for i in range(start, start + concurrent)))
            numbers[f"{way}_load_cpu_ms"] = 1000 * (time.process_time() - cpu) / calls
            numbers[f"{way}_load_wall_ms"] = 1000 * (time.perf_counter() - wall) / calls
        return numbers

    return uvloop.run(run())


def _reads_whole(turn: int) -> bool:
    """Every other round of the 20 sessions' turns reads the whole history, as a session's first turn on a replica
    does (after a restart, a failover, or once pushed out of the held histories); the others read on from the
    history the previous turn read, as the manager's next turn of a session does."""
    return (turn // 20) % 2 == 1


def measure(store: HistoryStore, turns: int, concurrent: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    ids = [f"bench-{run}-{i}" for i in range(20)]
    for session_id in ids:
        store.create(SessionRecord(session_id, "Be terse.", {"bench": True}, time.time(), time.time(), "bench"))
    for session_id in ids:
        store.append(session_id, TURN * 20, now=time.time())  # 40 messages each
    _timed(50, lambda i: store.messages(ids[i % 20], window=8))  # warm-up (connections, script cache)

    appends = _timed(turns, lambda i: store.append(ids[i % 20], TURN, now=time.time()))
    reads = _timed(turns, lambda i: store.messages(ids[i % 20], window=8))

    held = HeldHistories()

    def one_turn(i: int) -> None:  # what SessionManager.turn and .commit call: the lease travels with both
        session_id, lease = ids[i % 20], Lease(uuid.uuid4().hex, 300.0)
        prior = None if _reads_whole(i) else held.get(session_id)  # whole: a session's first turn on a replica
        after = None if prior is None else prior.prefix
        record, messages = store.load(session_id, owner="bench", lease=lease, after=after)
        held.loaded(session_id, prior, record, messages)
        store.append(session_id, TURN, now=time.time(), holder=lease.holder, release=True)

    times = _timed(turns, one_turn)
    turn_times = [t for i, t in enumerate(times) if not _reads_whole(i)]
    whole_times = [t for i, t in enumerate(times) if _reads_whole(i)]
    # what the append route does: the owner check and the append, in one call
    append_route = _timed(turns, lambda i: store.append(ids[i % 20], TURN[:1], time.time(), owner="bench"))
    loop = from_a_loop(store, ids, max(turns, concurrent), concurrent)
    for session_id in ids:
        store.delete(session_id)
    return {
        **loop,
        "append_per_s": len(appends) / sum(appends),
        "window_read_per_s": len(reads) / sum(reads),
        "turn_ms_p50": 1000 * statistics.median(turn_times),
        "turn_ms_p90": 1000 * statistics.quantiles(turn_times, n=10)[-1],
        "whole_history_turn_ms_p50": 1000 * statistics.median(whole_times),
        "append_route_ms_p50": 1000 * statistics.median(append_route),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}: pick from {', '.join(BACKENDS)}")
    results: dict[str, dict[str, Any]] = {}
    with store_urls(args, sorted(set(backends) | {"memory"})) as urls:
        for backend in ["memory", *[b for b in backends if b != "memory"]]:
            store = open_store(urls[backend])
            try:
                results[backend] = measure(store, args.turns, args.concurrent)
            finally:
                store.close()
    base, whole = results["memory"]["turn_ms_p50"], results["memory"]["whole_history_turn_ms_p50"]
    for backend, numbers in results.items():
        numbers["store_share_ms_p50"] = numbers["turn_ms_p50"] - base
        numbers["whole_history_store_share_ms_p50"] = numbers["whole_history_turn_ms_p50"] - whole
        if backend in TARGET_MS:
            numbers["target_ms_p50"] = TARGET_MS[backend]
            numbers["meets_target"] = numbers["store_share_ms_p50"] <= TARGET_MS[backend]
    report = {
        "config": {
            "turns": args.turns,
            "window": 8,
            "history_messages": 40,
            "concurrent": args.concurrent,
            "backends": list(results),
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "backends": {b: results[b] for b in results if b in backends or b == "memory"},
    }
    table = Table(title="history stores on loopback (one thread)")
    columns = ("backend", "appends/s", "window reads/s", "turn p50 ms", "turn p90 ms", "store share p50 ms")
    for column in (*columns, "whole history: store share p50 ms", "append route p50 ms"):
        table.add_column(column, justify="right")
    for backend, n in report["backends"].items():
        target = f" (≤ {n['target_ms_p50']:g})" if "target_ms_p50" in n else ""
        table.add_row(
            backend,
            f"{n['append_per_s']:,.0f}",
            f"{n['window_read_per_s']:,.0f}",
            f"{n['turn_ms_p50']:.3f}",
            f"{n['turn_ms_p90']:.3f}",
            f"{n['store_share_ms_p50']:.3f}{target}",
            f"{n['whole_history_store_share_ms_p50']:.3f}",
            f"{n['append_route_ms_p50']:.3f}",
        )
    console.print(table)
    loop_table = Table(title=f"load(window=8) from an event loop, {args.concurrent} at once: CPU ms (wall ms) per call")
    for column in ("backend", "worker thread", "on the loop (loop_io)"):
        loop_table.add_column(column, justify="right")
    for backend, n in report["backends"].items():
        ways = [f"{n[f'{way}_load_cpu_ms']:.3f} ({n[f'{way}_load_wall_ms']:.3f})" if f"{way}_load_cpu_ms" in n else "-"
                for way in ("thread", "loop")]  # fmt: skip
        loop_table.add_row(backend, *ways)
    console.print(loop_table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
