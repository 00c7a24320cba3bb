"""loop_io: synchronous store code on the event loop, its waits awaited there (the store suites run the real drivers
through it: BACKENDS' "-on-loop" entries)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from contextlib import asynccontextmanager

import pytest

from sessions.store import loop_io

REQUEST = contextvars.ContextVar("request", default="none")


def waits_twice(a: int, b: int) -> tuple[int, bool, str]:
    """Store-like code: blocking-style calls whose I/O is a coroutine awaited by the loop."""
    first = loop_io.wait(asyncio.sleep(0, result=a))
    second = loop_io.wait(asyncio.sleep(0.01, result=b))
    return first + second, loop_io.inside(), REQUEST.get()


async def test_run_awaits_each_wait_on_the_loop_and_returns_the_result() -> None:
    REQUEST.set("r-1")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    other = asyncio.create_task(ticker())
    try:
        assert await loop_io.run(waits_twice, 2, b=3) == (5, True, "r-1")  # in a copy of the caller's context
    finally:
        other.cancel()
    assert ticks > 1  # the loop ran other tasks while the call waited
    assert not loop_io.inside()


async def test_calls_interleave_on_one_loop() -> None:
    results = await asyncio.gather(*(loop_io.run(waits_twice, n, n) for n in range(20)))
    assert [total for total, *_ in results] == [2 * n for n in range(20)]


async def test_an_awaited_error_is_raised_where_the_code_waited_and_can_be_handled_there() -> None:
    async def fails() -> None:
        raise ConnectionError("server gone")

    def handles() -> str:
        try:
            loop_io.wait(fails())
        except ConnectionError as error:
            return f"handled: {error}"
        return "not raised"

    def lets_it_through() -> None:
        loop_io.wait(fails())

    assert await loop_io.run(handles) == "handled: server gone"
    with pytest.raises(ConnectionError, match="server gone"):
        await loop_io.run(lets_it_through)


async def test_cancelling_the_caller_cancels_what_the_code_waits_for_and_runs_its_cleanup() -> None:
    cleaned = asyncio.Event()
    started = asyncio.Event()

    def long_call() -> None:
        loop_io.wait(_set(started))
        try:
            loop_io.wait(asyncio.sleep(60))
        finally:
            loop_io.wait(_set(cleaned))  # cleanup may wait too (a pool taking its connection back)

    task = asyncio.create_task(loop_io.run(long_call))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_wait_outside_run_is_refused() -> None:
    coroutine = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match=r"only for code running under loop_io\.run"):
        loop_io.wait(coroutine)
    coroutine.close()


async def test_entered_uses_an_async_context_manager_as_a_plain_with() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def transaction(suppress: bool):
        events.append("begin")
        try:
            yield "tx"
        except ValueError:
            events.append("rollback")
            if not suppress:
                raise
        else:
            events.append("commit")

    def commits() -> str:
        with loop_io.entered(transaction(False)) as tx:
            return tx

    def rolls_back(suppress: bool) -> str:
        with loop_io.entered(transaction(suppress)):
            raise ValueError("refused")
        return "suppressed"

    assert await loop_io.run(commits) == "tx"
    assert await loop_io.run(rolls_back, True) == "suppressed"
    with pytest.raises(ValueError, match="refused"):
        await loop_io.run(rolls_back, False)
    assert events == ["begin", "commit", "begin", "rollback", "begin", "rollback"]


async def test_per_loop_opens_once_for_concurrent_callers_and_retries_a_failed_opening() -> None:
    openings = 0
    fail_next = True

    async def opener() -> str:
        nonlocal openings, fail_next
        openings += 1
        await asyncio.sleep(0.01)
        if fail_next:
            fail_next = False
            raise ConnectionError("refused")
        return f"pool-{openings}"

    per_loop = loop_io.PerLoop(opener)
    with pytest.raises(ConnectionError):
        await loop_io.run(per_loop.get)
    assert await asyncio.gather(*(loop_io.run(per_loop.get) for _ in range(10))) == ["pool-2"] * 10
    assert openings == 2  # the failure was not kept; the ten callers shared one opening

    other_loop = await asyncio.to_thread(asyncio.run, loop_io.run(per_loop.get))  # another loop, its own object
    assert other_loop == "pool-3"


class _Store:
    def __init__(self, runs_on_loop: bool) -> None:
        self.runs_on_loop = runs_on_loop

    def where(self) -> tuple[bool, bool]:
        return loop_io.inside(), threading.current_thread() is threading.main_thread()


async def test_call_runs_on_the_loop_only_for_stores_that_can() -> None:
    network, local = _Store(runs_on_loop=True), _Store(runs_on_loop=False)
    assert await loop_io.call(network, network.where) == (True, True)  # this loop, this thread
    assert await loop_io.call(local, local.where) == (False, False)  # a worker thread
