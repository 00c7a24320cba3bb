"""What coalescing PostgreSQL appends would save: the CPU of this process and of PostgreSQL per append, one statement
per append (the store's `append` on the loop, as the ingress runs it) against one statement per batch of whatever
appends are waiting when the loop gets to them. A probe for a design not on main (docs/control-plane-measurements.md,
"Coalescing store calls"): its batched statement is the store's append reduced to what the probe's sessions need
(no owner, lease holder, KV report or ordered row lock), and the probe checks that both ways stored every message.

Each of `--concurrent` clients loops: wait a random 0..`--spread-ms` (requests arrive apart), spend `--busy-ms` of
CPU on the loop (a request's HTTP and FastAPI work), append one message to one of 300 sessions.

    .venv/bin/python -m benchmarks.append_coalescing --busy-ms 0.5 --spread-ms 2 --out append-coalescing.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import uvloop

from benchmarks.control_plane import _cpu_seconds, _cpu_spent, _store_url
from sessions.messages import Message
from sessions.store import loop_io
from sessions.store.base import SessionRecord
from sessions.store.postgresql import PostgreSQLStore

SESSIONS = 300
MESSAGE = Message("user", "a note appended without generating")
BATCH_MAX = 64
# One message for each of several distinct sessions: the store's _APPEND with arrays of sessions.
BATCHED_APPEND = (
    "WITH input AS (SELECT * FROM unnest(%(ids)s::text[], %(contents)s::text[]) AS t(id, content)),"
    " bumped AS (UPDATE sessionserve_sessions s SET next_seq = next_seq + 1, last_active_at = %(active)s FROM input"
    "  WHERE s.session_id = input.id AND (lease_holder IS NULL OR lease_until <= %(now)s)"
    "  RETURNING s.session_id, s.next_seq - 1 AS seq),"
    " inserted AS (INSERT INTO sessionserve_messages (session_id, seq, role, content)"
    "  SELECT b.session_id, b.seq, 'user', i.content FROM bumped b JOIN input i ON i.id = b.session_id)"
    " SELECT session_id FROM bumped"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres-url", default=None, help="a server to use (default: start one, durable)")
    parser.add_argument("--appends", type=int, default=4000, help="timed appends per way")
    parser.add_argument("--concurrent", type=int, default=16, help="client loops")
    parser.add_argument("--busy-ms", type=float, default=0.5, help="CPU each request spends on the loop first")
    parser.add_argument("--spread-ms", type=float, default=2.0, help="each request waits a random 0..this first")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


class Coalescer:
    """Appends that arrive while the loop is busy go out as one statement, once the loop has run what was ready
    (one connection: one statement at a time)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.waiting: list[tuple[str, asyncio.Future[bool]]] = []
        self.statements = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._flushing = False

    async def append(self, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((session_id, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(lambda: loop.create_task(self._flush()))
        if not await future:
            raise RuntimeError(f"session {session_id} refused the append")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _flush(self) -> None:
        if self._conn is None:
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        try:
            while self.waiting:
                batch, later, seen = [], [], set()
                for item in self.waiting[: 2 * BATCH_MAX]:  # one append per session a statement, in arrival order
                    (later if item[0] in seen or len(batch) == BATCH_MAX else batch).append(item)
                    seen.add(item[0])
                self.waiting = later + self.waiting[2 * BATCH_MAX :]
                now = time.time()
                params = {"ids": [sid for sid, _ in batch], "contents": [MESSAGE.content] * len(batch)}
                try:
                    cursor = await self._conn.execute(BATCHED_APPEND, params | {"active": now, "now": now})
                    stored = {sid for (sid,) in await cursor.fetchall()}
                except Exception as error:  # every append of the batch fails with it
                    for _, future in batch:
                        future.set_exception(error)
                    continue
                self.statements += 1
                for sid, future in batch:
                    future.set_result(sid in stored)
        finally:
            self._flushing = False


async def _measure(
    store: PostgreSQLStore, url: str, ids: list[str], way: str, args: argparse.Namespace
) -> dict[str, Any]:
    coalescer = Coalescer(url)
    made: Counter[str] = Counter()

    async def append(i: int) -> None:
        sid = ids[i % len(ids)]
        if way == "each":
            await loop_io.call(store, store.append, sid, [MESSAGE], time.time())
        else:
            await coalescer.append(sid)
        made[sid] += 1

    await asyncio.gather(*(append(i) for i in range(args.concurrent)))  # warm: pools open, statements prepared
    numbers = iter(range(args.appends))

    async def client() -> None:
        for i in numbers:
            await asyncio.sleep(random.uniform(0, args.spread_ms / 1000))
            started = time.perf_counter()
            while time.perf_counter() - started < args.busy_ms / 1000:
                pass
            await append(i)

    statements_before = coalescer.statements
    before, wall = _cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrent)))
    spent, wall = _cpu_spent(before), time.perf_counter() - wall  # this process is the "client", PostgreSQL "store"
    cpu, postgres = spent["client"], spent["store"]
    statements = args.appends if way == "each" else coalescer.statements - statements_before
    await coalescer.close()
    return {
        "cpu_ms_beyond_busy": round(1000 * cpu / args.appends - args.busy_ms, 3),
        "postgres_cpu_ms": round(1000 * postgres / args.appends, 3),
        "wall_ms": round(1000 * wall / args.appends, 3),
        "appends_per_statement": round(args.appends / statements, 2),
        "made": made,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with ExitStack() as stack:
        url = args.postgres_url or _store_url("postgresql", stack)
        store = PostgreSQLStore(url)
        stack.callback(store.close)
        results = {}
        for way in ("each", "coalesced"):  # each on sessions of its own, deleted after
            ids = [uuid.uuid4().hex for _ in range(SESSIONS)]
            for sid in ids:
                store.create(SessionRecord(sid, None, {}, 1.0, 1.0, None))
            results[way] = uvloop.run(_measure(store, url, ids, way, args))
            made = results[way].pop("made")
            stored = {sid: len(store.messages(sid)) for sid in ids}
            for sid in ids:
                store.delete(sid)
            if stored != {sid: made[sid] for sid in ids}:
                raise RuntimeError(f"{way}: the stored messages are not the appends made")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "postgres_url")}
    report = {"config": config, **results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
