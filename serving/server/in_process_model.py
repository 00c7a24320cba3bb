"""`serving.ingress: replica`: the ingress holds the model itself and calls it with a handle's call shape.

The ingress' routes are written against a DeploymentHandle (`model.options(session_id=...).query.remote(...)`,
awaited, or iterated with stream=True, and cancelled by a drain). Here the same calls reach an LLMServer in this
process: a unary call is a Task (awaitable and cancellable like a DeploymentResponse), a stream an async iterator
whose `cancel()` cancels whichever task is reading it, so the turn under it stops uncommitted, as a cancelled
remote stream does. No process hop, no serialization: the first token goes from the engine to the HTTP response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


class InProcessStream:
    """What `remote()` returns with stream=True: LLMServer's stream methods are coroutines that return the stream."""

    def __init__(self, started: Awaitable[AsyncIterator[Any]]) -> None:
        self._started: Awaitable[AsyncIterator[Any]] | None = started
        self._events: AsyncIterator[Any] | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._cancelled = False

    def __aiter__(self) -> InProcessStream:
        return self

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise asyncio.CancelledError("the stream was cancelled")
        self._reader = asyncio.current_task()
        if self._events is None:
            assert self._started is not None
            self._events, self._started = await self._started, None
        return await self._events.__anext__()

    def cancel(self) -> None:
        """Stop the turn: the task reading the stream is cancelled inside the engine's await."""
        self._cancelled = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


class _Method:
    def __init__(self, method: Callable[..., Awaitable[Any]], stream: bool) -> None:
        self._method, self._stream = method, stream

    def remote(self, *args: Any) -> asyncio.Task[Any] | InProcessStream:
        if self._stream:
            return InProcessStream(self._method(*args))
        return asyncio.ensure_future(self._method(*args))


class _Calls:
    def __init__(self, server: Any, stream: bool) -> None:
        self._server, self._stream = server, stream

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._server, name), self._stream)


class InProcessModel:
    """A DeploymentHandle's `options(...).method.remote(...)` over an LLMServer in this process. `session_id` is
    accepted and ignored: there is one replica, this one."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def options(self, *, stream: bool = False, session_id: str | None = None) -> _Calls:
        return _Calls(self.server, stream)

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.server, name), False)
