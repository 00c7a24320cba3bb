"""transformers' continuous batching (ContinuousBatchingManager) with its prefix sharing.

Configuration, chosen to match sessionserve's engine so the comparison is about KV policy, not sizing:
- `allow_block_sharing=True` (the default): full blocks are hashed and kept after a request finishes, so a later
  prompt with the same prefix (the session's next turn, or the shared system prompt) reuses them. They are
  best effort: under memory pressure the scheduler evicts *all* cached blocks at once.
- `page_size` = the engine's block_size; `num_blocks` = kv budget // (page_size * KV bytes per token), the same
  device budget as sessionserve's pool; `max_batch_tokens` and `max_requests_per_batch` = the engine's.
  With SDPA, transformers preallocates an attention mask of max_batch_tokens x (cache tokens) floats, so a budget
  far beyond what the run can ever fill (e.g. the tiny test model) is capped at the run's token bound: blocks past
  it would never be used, so the cap changes nothing but memory. `max_memory_percent=0.9`: the cache is sized
  explicitly, the percentage (0.6 of the NUMA node on CPU by default) is only transformers' safety check.
- attention stays on the model's SDPA (flash-attn is not available on CPU); greedy, EOS stops as everywhere.
Streaming: `add_request(streaming=True)` + `register_result_handler`, so TTFT is submit -> first token.
Prefix hits are counted by wrapping the cache's `search_prefix_match` (observation only).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from benchmarks.systems.base import BenchContext, StreamEvent, Turn, kv_bytes_per_token


class HFContinuousBatching:
    def __init__(self, name: str, context: BenchContext) -> None:
        self.name = name
        self.context = context
        engine = context.engine_config
        self.page_size = engine.block_size
        self.kv_bytes_per_token = kv_bytes_per_token(context.loaded)
        self.budget_blocks = max(1, engine.kv_cache_memory // (self.page_size * self.kv_bytes_per_token))
        self.num_blocks = self.budget_blocks
        if context.tokens_bound is not None:
            self.num_blocks = min(self.budget_blocks, -(-context.tokens_bound // self.page_size) + 1)
        self.cb_config = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=engine.max_batch_tokens,
            max_requests_per_batch=engine.max_batch_size,
            allow_block_sharing=True,
            max_memory_percent=0.9,
        )
        self.manager: Any = None
        self._ids = itertools.count()
        self._prefix_hits: dict[str, int] = {}
        self._instrumented: Any = None  # the cache object whose prefix search is wrapped
        self.evictions = 0

    async def start(self) -> None:
        loaded = self.context.loaded
        eos = loaded.model.generation_config.eos_token_id
        if eos is None:
            eos = loaded.tokenizer.eos_token_id
        generation = GenerationConfig(
            max_new_tokens=self.context.max_new_tokens,
            do_sample=False,
            eos_token_id=[] if self.context.ignore_eos else eos,  # [] = no token ends a reply
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        self.manager = loaded.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=self.cb_config
        )
        self.manager.start()

    def _instrument(self) -> None:
        """Count prefix-cache hits per request and evictions; the batch processor exists once the loop started."""
        processor = self.manager.batch_processor
        cache = getattr(processor, "cache", None)
        if cache is None or cache is self._instrumented:
            return
        search: Callable[[str, list[int]], int] = cache.search_prefix_match
        evict: Callable[[], bool] = cache.evict_cached_blocks

        def counted_search(request_id: str, prompt_ids: list[int]) -> int:
            matched = search(request_id, prompt_ids)
            self._prefix_hits[request_id] = self._prefix_hits.get(request_id, 0) + matched
            return matched

        def counted_evict() -> bool:
            evicted = evict()
            self.evictions += int(evicted)
            return evicted

        cache.search_prefix_match, cache.evict_cached_blocks = counted_search, counted_evict
        self._instrumented = cache

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        """Nothing to store: every turn's prompt is rendered by the driver."""

    async def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]:
        prompt_ids, max_new_tokens = turn.prompt_ids, turn.max_new_tokens
        self._instrument()
        request_id = f"{session_id}#{next(self._ids)}"
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.manager.register_result_handler(request_id, queue.put_nowait)
        added = self.manager.add_request(
            prompt_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True
        )
        if added is None:
            fatal = self.manager.background_thread_status.fatal_error
            raise RuntimeError(f"the continuous batching manager refused the request; its loop failed with: {fatal!r}")
        seen = 0
        while True:
            output = await queue.get()
            if output.error is not None:
                raise RuntimeError(f"hf-cb request {request_id} failed: {output.error}")
            new = list(output.generated_tokens[seen:])
            seen += len(new)
            cached = self._prefix_hits.pop(request_id, None) if self._instrumented is not None else None
            if new or output.is_finished():
                yield StreamEvent(new, cached)
            if output.is_finished():
                return

    async def end_session(self, session_id: str) -> None:
        pass  # nothing to free: finished requests' blocks stay cached until evicted

    async def close(self) -> None:
        if self.manager is not None:
            # hard stop: our requests are all finished unless the run failed, and then nothing should wait for them
            await asyncio.to_thread(self.manager.stop, block=True, timeout=30.0, hard_stop=True)
            self.manager.destroy()

    def info(self) -> dict[str, Any]:
        cache = self._instrumented
        return {
            "page_size": self.page_size,
            "num_blocks_budget": self.budget_blocks,
            "num_blocks_requested": self.num_blocks,
            "num_blocks": getattr(cache, "num_blocks", None),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_batch_tokens": self.cb_config.max_batch_tokens,
            "max_requests_per_batch": self.cb_config.max_requests_per_batch,
            "allow_block_sharing": True,
            "use_prefix_sharing": getattr(cache, "use_prefix_sharing", None),
            "attn_implementation": self.context.loaded.model.config._attn_implementation,
            "cached_block_evictions": self.evictions,
            "ttft_measured": "submit -> first streamed output (add_request(streaming=True) + result handler)",
        }
