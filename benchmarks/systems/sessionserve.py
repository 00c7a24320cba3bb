"""sessionserve's engine through the Engine protocol, with (`sessionserve`) or without (`-nokv`) session KV reuse.

`sessionserve-nokv` passes cache_key=None, so the whole history is prefilled again every turn: what
DeepSpeed-MII's legacy sessions do (they keep the text and prepend it to each query).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from benchmarks.systems.base import BenchContext, StreamEvent, Turn
from serving.engine.paged_engine import PagedEngine
from serving.engine.types import GenerationRequest, SamplingParams


class EngineSystem:
    def __init__(self, name: str, context: BenchContext, reuse_kv: bool) -> None:
        self.name = name
        self.context = context
        self.reuse_kv = reuse_kv
        self.engine: PagedEngine | None = None

    async def start(self) -> None:
        self.engine = PagedEngine(self.context.loaded, self.context.engine_config)

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        """Nothing to store: every turn's prompt is rendered by the driver."""

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        prompt_ids, max_new_tokens = turn.prompt_ids, turn.max_new_tokens
        assert self.engine is not None, "start() first"
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=self.context.ignore_eos),
            cache_key=session_id if self.reuse_kv else None,
        )
        async with aclosing(self.engine.generate(request)) as chunks:
            async for chunk in chunks:
                yield StreamEvent(list(chunk.token_ids), chunk.cached_tokens)

    async def end_session(self, session_id: str) -> None:
        if self.engine is not None and self.reuse_kv:
            self.engine.release(session_id)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "engine": type(self.engine).__name__,
            "cache_key": "session id" if self.reuse_kv else None,
            "engine_config": self.context.engine_config.model_dump(),
            "ttft_measured": "submit -> first streamed chunk with tokens (Engine.generate)",
        }
        if self.engine is not None:
            info["engine_stats"] = self.engine.stats()
        return info
