"""`PagedEngine`: the continuous-batching engine behind the asynchronous `Engine` protocol.

A background thread runs `LLMEngine.step()` while there is work and sleeps otherwise. Each request has an
asyncio.Queue on its caller's event loop, fed with `loop.call_soon_threadsafe`; closing the stream early (or
`cancel`) aborts the request, which leaves the batch at the next step.

A step that raises leaves the KV pool in an unknown state, so the engine does not go on: every in-flight request
ends with `EngineFailed` naming the cause, new requests are refused, and `health()` reports it, which makes the
Ray replica unhealthy so Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from serving.config import EngineConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.types import EngineFailed, GenerationChunk, GenerationRequest, KVInfo
from serving.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationChunk | BaseException] = field(default_factory=asyncio.Queue)


class StepCore(Protocol):
    """The synchronous engine a `PagedEngine` drives from its thread: `LLMEngine`, or `MiiCore` (mii_engine.py)."""

    @property
    def lock(self) -> threading.RLock: ...
    @property
    def requests(self) -> Mapping[str, object]: ...
    @property
    def max_context_tokens(self) -> int: ...

    def add_request(self, spec: GenerationRequest) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[GenerationChunk]: ...
    def fail_all(self) -> list[str]: ...
    def release(self, cache_key: str) -> None: ...
    def fork(self, source_key: str, target_key: str) -> None: ...
    def cache_keys(self) -> list[str]: ...
    def kv_info(self, cache_key: str) -> KVInfo: ...
    def stats(self) -> dict[str, float]: ...
    def persist(self, timeout_s: float) -> bool: ...
    def close(self) -> None: ...


class PagedEngine:
    """Implements `serving.engine.types.Engine` with continuous batching over a paged, tiered KV cache (or over
    another `StepCore`: the same streaming, cancelling and failure handling for every engine kind)."""

    def __init__(
        self,
        loaded: LoadedModel | None,
        config: EngineConfig | None = None,
        kv_dir: Path | None = None,
        persist_timeout_s: float = 30.0,
        core: StepCore | None = None,
    ) -> None:
        """`kv_dir`: the disk tier's directory (None: no disk tier); on shutdown, idle sessions' KV is written there
        for up to `persist_timeout_s`, so a restarted engine reuses it."""
        if core is None:
            if loaded is None:
                raise ValueError("PagedEngine needs a loaded model or a core")
            core = LLMEngine(loaded, config or EngineConfig(), kv_dir=kv_dir)
        self.core: StepCore = core
        self.persist_timeout_s = persist_timeout_s
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._closed = False
        self._failure: str | None = None  # why the step loop stopped serving, once it has
        self._thread = threading.Thread(target=self._run, name="sessionserve-paged-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- contract

    @property
    def max_context_tokens(self) -> int:
        return self.core.max_context_tokens

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Validate and enqueue now (a bad request raises ValueError here), then stream chunks."""
        if self._closed:
            raise EngineFailed("engine is shut down")
        stream = _Stream(loop=asyncio.get_running_loop())
        with self.core.lock:  # ordered with _fail(): a request is either refused here or failed there
            if (problem := self.health()) is not None:
                raise EngineFailed(problem)
            if request.request_id in self._streams:
                raise ValueError(f"request id {request.request_id!r} is already running")
            self._streams[request.request_id] = stream  # before the worker can produce its first output
            try:
                self.core.add_request(request)
            except BaseException:
                del self._streams[request.request_id]
                raise
        self._wake.set()
        return self._stream(request.request_id, stream)

    async def _stream(self, request_id: str, stream: _Stream) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.core.abort(request_id)  # the consumer went away
                self._wake.set()
            self._streams.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    def release(self, cache_key: str) -> None:
        self.core.release(cache_key)

    def kv_info(self, cache_key: str) -> KVInfo:
        return self.core.kv_info(cache_key)

    def cache_keys(self) -> list[str]:
        return self.core.cache_keys()

    def fork(self, source_key: str, target_key: str) -> None:
        self.core.fork(source_key, target_key)

    def stats(self) -> dict[str, float]:
        """Counters for benchmarks: steps, forward_s, step_s, running, waiting, blocks per tier, cached tokens."""
        return self.core.stats()

    def health(self) -> str | None:
        if self._failure is not None:
            return self._failure
        if not self._thread.is_alive() and not self._closed:
            return "the engine's step loop is not running"
        return None

    async def shutdown(self) -> None:
        if self._closed:
            return
        for request_id in list(self.core.requests):
            self.core.abort(request_id)
        self._closed = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        if self._failure is None and not await asyncio.to_thread(self.core.persist, self.persist_timeout_s):
            log.warning("some sessions' KV was not on disk %.0f s into shutdown", self.persist_timeout_s)
        self.core.close()

    # ----------------------------------------------------------------------------------------- worker

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while self.core.has_work() and self._failure is None:
                try:
                    outputs = self.core.step()
                except Exception as error:
                    self._fail(error)
                    return
                for output in outputs:
                    self._send(output.request_id, output)

    def _fail(self, error: Exception) -> None:
        """Stop serving: end every in-flight request with the cause; later requests are refused."""
        log.exception("engine step failed; failing all requests and reporting the engine unhealthy")
        with self.core.lock:
            self._failure = f"the engine's step failed ({type(error).__name__}: {error}); it must be restarted"
            failure = EngineFailed(self._failure)
            for request_id in self.core.fail_all():
                self._send(request_id, failure)

    def _send(self, request_id: str, item: GenerationChunk | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self.core.abort(request_id)
