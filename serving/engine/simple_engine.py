"""The one-at-a-time engine: plain transformers forward passes with per-session KV reuse.

One worker thread runs torch, taking requests from a queue in arrival order; tokens go back to the
caller's event loop with `loop.call_soon_threadsafe` into the request's own asyncio.Queue. Each session
(`cache_key`) keeps a `DynamicCache` plus the token ids whose KV it holds; a new request with the same key
reuses the longest common prefix and prefills only the rest. It is the reference the continuous-batching
engine is checked against, and the fallback where batching does not pay (a single user, tests).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.sampler import make_generator, sample
from serving.engine.token_ids import common_prefix_length, eos_token_ids, validate_request
from serving.engine.types import FinishReason, GenerationChunk, GenerationRequest, KVInfo
from serving.models import LoadedModel

log = logging.getLogger(__name__)

_SHUTDOWN = object()


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` tokens of `cache` (transformers 5 `crop` takes the number to remove, negated)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


@dataclass(slots=True)
class _Session:
    cache: DynamicCache
    token_ids: list[int]  # the tokens whose KV `cache` holds, in order
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the worker changes the cache


@dataclass(slots=True)
class _Request:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # set by the worker when it takes the request


class SimpleEngine:
    """Implements `serving.engine.types.Engine`, one generation at a time."""

    def __init__(self, loaded: LoadedModel, *, max_cached_sessions: int = 64, max_model_len: int = 0) -> None:
        """`max_model_len` caps the context (prompt + reply) below the model's own limit; 0 = the model's."""
        if max_cached_sessions < 0 or max_model_len < 0:
            raise ValueError("max_cached_sessions and max_model_len must be >= 0")
        self._loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._device = loaded.device
        self._max_sessions = max_cached_sessions
        self._eos = eos_token_ids(loaded.tokenizer, loaded.model)
        self._vocab_size = int(self._model.get_input_embeddings().weight.shape[0])
        model_limit = int(getattr(self._model.config, "max_position_embeddings", 0) or 2048)
        self._max_context = min(max_model_len, model_limit) if max_model_len else model_limit
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # LRU order, most recent last
        self._lock = threading.Lock()  # guards _sessions (never taken while holding a session's lock)
        self._requests: dict[str, _Request] = {}
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="sessionserve-simple-engine", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------------------------------- contract

    @property
    def max_context_tokens(self) -> int:
        return self._max_context

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Validate and enqueue now (a bad request raises ValueError here), then stream chunks."""
        if self._closed:
            raise RuntimeError("engine is shut down")
        self._validate(request)
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        entry = _Request(request=request, loop=asyncio.get_running_loop(), out=asyncio.Queue())
        self._requests[request.request_id] = entry
        self._queue.put(entry)
        return self._stream(entry)

    async def _stream(self, entry: _Request) -> AsyncIterator[GenerationChunk]:
        finished = False
        try:
            while True:
                item = await entry.out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                entry.cancelled.set()  # consumer went away: stop at the next token
            self._forget_request(entry)

    def _forget_request(self, entry: _Request) -> None:
        if self._requests.get(entry.request.request_id) is entry:
            del self._requests[entry.request.request_id]

    async def cancel(self, request_id: str) -> None:
        entry = self._requests.get(request_id)
        if entry is not None:
            entry.cancelled.set()

    def stats(self) -> dict[str, float]:
        with self._lock:
            cached_sessions = len(self._sessions)
        running = sum(1 for entry in self._requests.values() if entry.started)
        return {
            "running": running,
            "waiting": len(self._requests) - running,
            "cached_sessions": cached_sessions,
        }

    def release(self, cache_key: str) -> None:
        with self._lock:
            self._sessions.pop(cache_key, None)

    def cache_keys(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def kv_info(self, cache_key: str) -> KVInfo:
        with self._lock:
            session = self._sessions.get(cache_key)
        tokens = len(session.token_ids) if session is not None else 0  # no session lock: a count is enough
        return KVInfo(tier="device", tokens=tokens) if tokens else KVInfo(tier="none", tokens=0)

    def fork(self, source_key: str, target_key: str) -> None:
        """Deep-copy the source's KV (waits for at most one forward pass if the source is generating)."""
        if source_key == target_key:
            return
        with self._lock:
            source = self._sessions.get(source_key)
            self._sessions.pop(target_key, None)
        if source is None:
            return  # nothing to share: the target recomputes from its history later
        with source.lock:
            target = _Session(cache=copy.deepcopy(source.cache), token_ids=list(source.token_ids))
        with self._lock:
            self._sessions[target_key] = target
            self._evict_locked()

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for entry in list(self._requests.values()):
            entry.cancelled.set()
        self._queue.put(_SHUTDOWN)
        await asyncio.to_thread(self._worker.join)
        with self._lock:
            self._sessions.clear()

    # ----------------------------------------------------------------------------------------- internals

    def _validate(self, request: GenerationRequest) -> None:
        validate_request(request, self._max_context, self._vocab_size)

    def _evict_locked(self) -> None:
        while len(self._sessions) > self._max_sessions:
            key, _ = self._sessions.popitem(last=False)
            log.debug("evicted KV of session %s", key)

    def _emit(self, entry: _Request, item: GenerationChunk | BaseException) -> None:
        try:
            entry.loop.call_soon_threadsafe(entry.out.put_nowait, item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                # done even if nobody ever iterates the stream: free the request id
                entry.loop.call_soon_threadsafe(self._forget_request, entry)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            entry.cancelled.set()

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is _SHUTDOWN:
                return
            try:
                self._run(entry)
            except Exception as error:
                log.exception("generation %s failed", entry.request.request_id)
                self._emit(entry, error)

    def _checkout(self, key: str | None, prompt: list[int]) -> tuple[_Session, int]:
        """The session to extend (created if missing) and how many prompt tokens its KV already covers."""
        with self._lock:
            session = self._sessions.get(key) if key is not None else None
            if session is None:
                session = _Session(cache=DynamicCache(config=self._model.config), token_ids=[])
                if key is not None and self._max_sessions > 0:
                    self._sessions[key] = session
                    self._evict_locked()
                return session, 0
            self._sessions.move_to_end(key)
        with session.lock:
            # Reuse the common prefix but recompute at least the last prompt token, for its logits.
            reuse = min(common_prefix_length(session.token_ids, prompt), len(prompt) - 1)
            crop_cache(session.cache, reuse)
            del session.token_ids[reuse:]
        return session, reuse

    def _forget(self, key: str | None, session: _Session) -> None:
        """Drop a session whose cache may no longer match its token ids (a forward pass failed)."""
        if key is None:
            return
        with self._lock:
            if self._sessions.get(key) is session:
                del self._sessions[key]

    @torch.inference_mode()
    def _forward(self, session: _Session, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model on top of `session`'s KV; return the last position's logits [1, V]."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        with session.lock:
            out = self._model(input_ids=input_ids, past_key_values=session.cache, use_cache=True, logits_to_keep=1)
            session.token_ids.extend(ids)
        return out.logits[:, -1, :]

    def _run(self, entry: _Request) -> None:
        entry.started = True
        request = entry.request
        params = request.params
        prompt = list(request.prompt_token_ids)
        base = {"prompt_tokens": len(prompt)}
        if entry.cancelled.is_set():
            self._emit(entry, GenerationChunk(token_ids=[], text="", finish_reason="cancelled", **base))
            return
        session, cached = self._checkout(request.cache_key, prompt)
        base["cached_tokens"] = cached
        detok = IncrementalDetokenizer(self._tokenizer, params.stop, prompt_ids=prompt)
        generator = make_generator(params, self._device)
        limit = min(params.max_new_tokens, self._max_context - len(prompt))
        params_list, generators = [params], [generator]
        try:
            logits = self._forward(session, prompt[cached:])
            generated = 0
            while True:
                token = int(sample(logits, params_list, generators)[0])
                generated += 1
                finish: FinishReason | None = None
                if token in self._eos and not params.ignore_eos:
                    text, finish = detok.flush(), "stop"
                else:
                    text = detok.add(token)
                    if detok.stopped:
                        finish = "stop"
                    elif generated >= limit:
                        text, finish = text + detok.flush(), "length"
                    elif entry.cancelled.is_set():
                        text, finish = text + detok.flush(), "cancelled"
                self._emit(entry, GenerationChunk(token_ids=[token], text=text, finish_reason=finish, **base))
                if finish is not None:
                    return
                logits = self._forward(session, [token])
        except BaseException:
            self._forget(request.cache_key, session)
            raise
