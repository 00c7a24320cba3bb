"""serving.server.in_process_model: the handle call shape over an object in this process (`serving.ingress: replica`).

A drain cancels what it finds in flight: a unary call must stop like a cancelled task, a stream must stop the turn
under it (its generator sees the cancellation at its await, so nothing after it, such as a commit, runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from serving.server.in_process_model import InProcessModel


class FakeServer:
    """LLMServer's two call kinds: a coroutine, and a coroutine returning a stream."""

    def __init__(self) -> None:
        self.committed = False
        self.stopped_at: str | None = None
        self.release = asyncio.Event()

    async def ready(self) -> str | None:
        return None

    async def query(self, session_id: str) -> str:
        await self.release.wait()
        return f"reply to {session_id}"

    async def query_stream(self, session_id: str) -> AsyncIterator[str]:
        return self._turn(session_id)

    async def _turn(self, session_id: str) -> AsyncIterator[str]:
        try:
            yield session_id
            yield "first token"
            await self.release.wait()  # generating the rest
            yield "rest"
            self.committed = True
        except asyncio.CancelledError:
            self.stopped_at = "generating"
            raise


def test_unary_calls_are_tasks_a_drain_can_await_or_cancel():
    async def run() -> None:
        server = FakeServer()
        model = InProcessModel(server)
        assert await model.ready.remote() is None  # no options(): as handle.ready.remote()
        call = model.options(session_id="s").query.remote("s")
        server.release.set()
        assert await call == "reply to s"
        server.release.clear()
        hung = model.options(session_id="t").query.remote("t")
        await asyncio.sleep(0)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung

    asyncio.run(run())


def test_cancelling_a_stream_stops_its_turn_where_it_waits_and_nothing_after_runs():
    async def run() -> None:
        server = FakeServer()
        stream = InProcessModel(server).options(stream=True, session_id="s").query_stream.remote("s")
        assert [await stream.__anext__(), await stream.__anext__()] == ["s", "first token"]

        async def read_rest() -> list[str]:
            return [event async for event in stream]

        reader = asyncio.create_task(read_rest())
        await asyncio.sleep(0.01)  # the reader waits inside the turn
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reader, 5)  # a cancel that missed the reader times out instead
        assert server.stopped_at == "generating" and not server.committed
        with pytest.raises(asyncio.CancelledError):
            await stream.__anext__()

    asyncio.run(run())


def test_a_stream_that_ends_by_itself_is_read_whole():
    async def run() -> None:
        server = FakeServer()
        server.release.set()
        stream = InProcessModel(server).options(stream=True, session_id="s").query_stream.remote("s")
        assert [event async for event in stream] == ["s", "first token", "rest"]
        assert server.committed

    asyncio.run(run())
