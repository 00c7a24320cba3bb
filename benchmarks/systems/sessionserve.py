"""sessionserve's engine through the Engine protocol, with (`sessionserve`) or without (`-nokv`) session KV reuse.

`sessionserve-nokv` passes cache_key=None, so the whole history is prefilled again every turn: what
DeepSpeed-MII's legacy sessions do (they keep the text and prepend it to each query).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from benchmarks.systems.base import BenchContext, StreamEvent
from serving.engine.types import Engine, GenerationRequest, SamplingParams

PREFERRED_KINDS = ("paged", "simple")  # best first: the continuous-batching engine when it exists


class EngineSystem:
    def __init__(self, name: str, context: BenchContext, reuse_kv: bool) -> None:
        self.name = name
        self.context = context
        self.reuse_kv = reuse_kv
        self.engine: Engine | None = None
        self.kind: str | None = None
        self.kind_errors: dict[str, str] = {}

    async def start(self) -> None:
        from serving.engine import factory  # written alongside; missing -> this system fails clearly

        kinds: tuple[str, ...] = PREFERRED_KINDS
        if self.context.engine_kind:
            kinds = (self.context.engine_kind,)
        elif hasattr(factory, "engine_kinds"):
            kinds = tuple(kind for kind in PREFERRED_KINDS if kind in factory.engine_kinds()) or PREFERRED_KINDS
        for kind in kinds:
            try:
                self.engine = factory.build_engine(self.context.loaded, self.context.engine_config, kind)
            except Exception as error:  # an unknown or unfinished kind: try the next one
                self.kind_errors[kind] = f"{type(error).__name__}: {error}"
                continue
            self.kind = kind
            return
        raise RuntimeError(f"no engine kind could be built: {self.kind_errors}")

    async def stream(self, session_id: str, prompt_ids: list[int], max_new_tokens: int) -> AsyncIterator[StreamEvent]:
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
            "engine_kind": self.kind,
            "cache_key": "session id" if self.reuse_kv else None,
            "engine_config": self.context.engine_config.model_dump(),
            "ttft_measured": "submit -> first streamed chunk with tokens (Engine.generate)",
        }
        if self.kind_errors:
            info["engine_kinds_unavailable"] = self.kind_errors
        stats = getattr(self.engine, "stats", None)  # optional: whatever counters the engine exposes
        if stats is not None:
            try:
                info["engine_stats"] = stats() if callable(stats) else stats
            except Exception as error:
                info["engine_stats_error"] = repr(error)
        return info
