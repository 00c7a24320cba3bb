"""Plain transformers `model.generate`, one request at a time (requests of concurrent sessions queue).

No KV survives a request. TTFT is measured with a streamer from submission, so it includes the time a
request waits for the model behind other sessions' requests, like any client of a one-at-a-time server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.systems.base import BenchContext, StreamEvent, Turn


class _QueueStreamer(BaseStreamer):
    """Hands each new token to the event loop; `None` marks the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[int] | None]) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.flatten().tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class HFGenerate:
    def __init__(self, name: str, context: BenchContext) -> None:
        self.name = name
        self.context = context
        self.lock = asyncio.Lock()  # one generate() at a time, FIFO

    async def start(self) -> None:
        pass

    def _generate(self, prompt_ids: list[int], max_new_tokens: int, streamer: _QueueStreamer) -> None:
        loaded = self.context.loaded
        input_ids = torch.tensor([prompt_ids], device=loaded.device)
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=loaded.tokenizer.pad_token_id,
                    streamer=streamer,
                    **({"eos_token_id": []} if self.context.ignore_eos else {}),  # [] = no token ends a reply
                )
        finally:
            streamer.end()  # also on error, so the consumer never waits forever

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        """Nothing to store: every turn's prompt is rendered by the driver."""

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        prompt_ids, max_new_tokens = turn.prompt_ids, turn.max_new_tokens
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        async with self.lock:
            done = asyncio.Event()
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    self._generate(prompt_ids, max_new_tokens, _QueueStreamer(loop, queue))
                except BaseException as error:
                    errors.append(error)
                finally:
                    loop.call_soon_threadsafe(done.set)

            threading.Thread(target=run, name=f"hf-generate-{session_id}", daemon=True).start()
            while (tokens := await queue.get()) is not None:
                yield StreamEvent(tokens, cached_tokens=0)
            await done.wait()
            if errors:
                raise errors[0]

    async def end_session(self, session_id: str) -> None:
        pass

    async def close(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {
            "kv": "per-request DynamicCache, nothing kept between turns; no shared KV pool (budget not applicable)",
            "scheduling": "one request at a time, FIFO across sessions",
            "ttft_measured": "submit (incl. waiting for the model) -> first token from a generate() streamer",
        }
