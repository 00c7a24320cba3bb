"""Store calls on the event loop: a store's methods as written, their network waits awaited instead of blocked on.

Handing every store call to a worker thread (`asyncio.to_thread`) costs the caller CPU of its own: 16 concurrent
PostgreSQL reads cost 0.32–0.55 ms of CPU each through a thread and 0.26–0.43 ms through psycopg's asyncio connection
on the loop (`benchmarks/stores.py`; README, "Store calls from an event loop, without a thread hop"), and a slow
store no longer fills the loop's few executor threads. psycopg and redis-py each have an asyncio twin of their
blocking API, so a network store runs its ordinary synchronous methods inside a greenlet on the loop: where a method
would block on the server, its one I/O seam hands the driver's coroutine to `wait`, which switches back to the loop
to await it and resumes the method with the result. One code path per operation, two ways to drive its I/O
(SQLAlchemy's asyncio support works the same way). Stores that cannot (SQLite, memory) keep their worker thread:
`call` picks.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, ParamSpec, TypeVar

import greenlet  # type: ignore[import-untyped]  # ships no type information

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class _OnLoop(greenlet.greenlet):  # type: ignore[misc]
    """A store call running on the loop; its parent is the loop's own greenlet."""


async def run(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` on this loop; each `wait` inside it is awaited here. Like `asyncio.to_thread`, it runs
    in a copy of the caller's context; a cancelled caller cancels what it waits for."""
    call = _OnLoop(functools.partial(fn, *args, **kwargs), greenlet.getcurrent())
    call.gr_context = contextvars.copy_context()
    pending = call.switch()
    while not call.dead:
        try:
            value = await pending
        except BaseException as error:  # into the call, where its own handlers (and `finally`s) see it
            pending = call.throw(error)
        else:
            pending = call.switch(value)
    return pending  # type: ignore[no-any-return]


def inside() -> bool:
    """Whether this code runs under `run` (its store I/O must then go through `wait`)."""
    return isinstance(greenlet.getcurrent(), _OnLoop)


def wait(awaitable: Awaitable[T]) -> T:
    """From inside `run`: suspend until the loop has awaited `awaitable`; its result, or its exception raised here."""
    current = greenlet.getcurrent()
    if not isinstance(current, _OnLoop):
        raise RuntimeError("loop_io.wait is only for code running under loop_io.run")
    return current.parent.switch(awaitable)  # type: ignore[no-any-return]


@contextmanager
def entered(manager: AbstractAsyncContextManager[T]) -> Iterator[T]:
    """An async context manager (a driver's transaction, say) used as a plain `with` from inside `run`."""
    value = wait(manager.__aenter__())
    try:
        yield value
    except BaseException as error:
        if not wait(manager.__aexit__(type(error), error, error.__traceback__)):
            raise
    else:
        wait(manager.__aexit__(None, None, None))


class PerLoop:
    """A driver object bound to the loop it was opened on (an asyncio connection pool, client): one per loop, opened
    by the first call that needs it while later calls wait for that opening; a failed opening is retried next time."""

    def __init__(self, opener: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self._opener = opener
        self._entries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def get(self) -> Any:
        """From inside `run`: this loop's object."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is None:
            entry = self._entries[loop] = loop.create_task(self._opener())
        if not isinstance(entry, asyncio.Task):
            return entry
        try:
            opened = wait(asyncio.shield(entry))
        except BaseException:
            if entry.done() and self._entries.get(loop) is entry:
                del self._entries[loop]
            raise
        self._entries[loop] = opened
        return opened

    def close_all(self, close: Callable[[Any], Coroutine[Any, Any, object]]) -> None:
        """Close each loop's opened object on its own loop (from any thread; a closed loop's are left to the
        collector), without waiting for it."""
        for loop, entry in list(self._entries.items()):
            if not isinstance(entry, asyncio.Task) and not loop.is_closed():
                asyncio.run_coroutine_threadsafe(close(entry), loop)
        self._entries.clear()


async def call(store: object, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """A store-bound call (a store method, or manager code that calls the store) without blocking the loop: on the
    loop where `store` can do its I/O there (`runs_on_loop`), otherwise in a worker thread."""
    if getattr(store, "runs_on_loop", False):
        return await run(fn, *args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
