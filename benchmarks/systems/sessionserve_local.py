"""`sessionserve-local`: the whole in-process path through `LocalClient` (store, prompt building, tokenization,
engine, commit, its thread hand-offs), with the server's own account of where each turn's time went.

Unlike `sessionserve` (the engine alone, fed pre-rendered ids) this system sends only the user's message; the
session's history lives in the store and the service builds the prompt, as for any LocalClient user.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.systems.base import BenchContext, StreamEvent, Turn
from benchmarks.systems.served import final_event, served_config, split_history, store_dir
from serving.client import LocalClient
from serving.server.protocol import QueryResponse

_DONE = object()


class LocalSystem:
    def __init__(self, name: str, context: BenchContext) -> None:
        self.name = name
        self.context = context
        self.store_dir = store_dir(name)
        self.client: LocalClient | None = None
        # LocalClient.stream_events is a blocking iterator: one thread per request in flight, never a shared few
        self._threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix="bench-local")

    async def start(self) -> None:
        self.client = await asyncio.to_thread(LocalClient, served_config(self.context, self.store_dir))

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        assert self.client is not None, "start() first"
        system_prompt, messages = split_history(history)
        await asyncio.to_thread(self.client.create_session, session_id, system_prompt=system_prompt, messages=messages)

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        client = self.client
        assert client is not None, "start() first"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def pump() -> None:
            try:
                for event in client.stream_events(
                    turn.user,
                    session_id=session_id,
                    max_new_tokens=turn.max_new_tokens,
                    ignore_eos=self.context.ignore_eos,
                ):
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except BaseException as error:  # handed to the event loop
                loop.call_soon_threadsafe(events.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _DONE)

        loop.run_in_executor(self._threads, pump)
        while (event := await events.get()) is not _DONE:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, QueryResponse):
                usage = event.usage
                yield final_event(
                    usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, event.timing.phases_ms
                )
            elif event:
                yield StreamEvent(text=event)

    async def end_session(self, session_id: str) -> None:
        if self.client is not None:
            await asyncio.to_thread(self.client.destroy_session, session_id)

    async def close(self) -> None:
        if self.client is not None:
            await asyncio.to_thread(self.client.close)
        self._threads.shutdown(wait=False)
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "path": "LocalClient.stream_events -> SessionAPI -> SessionService (SQLite store) -> PagedEngine",
            "store": "sqlite (temporary directory)",
            "ttft_measured": "submit -> first text piece handed to the driver's event loop",
        }
        if self.client is not None:
            info["engine_stats"] = self.client.api.service.engine.stats()
        return info
