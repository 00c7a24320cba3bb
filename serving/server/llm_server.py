"""The Ray Serve model deployment: one replica = one model + engine + SessionService.

The ingress calls typed methods (`handle.options(session_id=...).query.remote(...)`). Errors travel back as
values (`Reply.error`) rather than exceptions, so the ingress never has to unwrap Ray's error types; every
reply also carries this replica's metrics report for the ingress' /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ray import serve
from ray.serve.exceptions import RayServeException

from serving.config import Config
from serving.logs import configure_logging
from serving.server import protocol
from serving.server.api import SessionAPI
from serving.server.inherit import InheritedWarmup
from serving.server.metrics import ReplicaReport, TurnSample
from serving.server.openai_protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from serving.service import SessionService, TurnResult, WarmResult, WarmSource

log = logging.getLogger(__name__)
turn_log = logging.getLogger("serving.turns")  # one line per turn, for operators

T = TypeVar("T")
# What a stream yields: the replica's name first, then the events, then a ReplicaReport (an protocol.APIError ends it).
StreamEvent = str | protocol.QueryResponse | ChatCompletionChunk | protocol.APIError | ReplicaReport


@dataclass(frozen=True, slots=True)
class Reply(Generic[T]):
    """A unary call's outcome: the value, or an error with its HTTP status; plus who answered and its report."""

    value: T | None = None
    error: protocol.APIError | None = None
    replica: str = ""
    report: ReplicaReport | None = None


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (direct instantiation in tests)
        return f"pid-{os.getpid()}"


def _request_id() -> str | None:
    """The x-request-id of the HTTP request behind this call. Ray Serve's proxy takes it from the header (or
    generates one and echoes it in the response), and its handle calls carry it from the ingress to this replica."""
    from ray.serve.context import _get_serve_request_context  # Ray has no public accessor (2.60)

    return _get_serve_request_context().request_id or None


@serve.deployment(name="LLMServer", max_ongoing_requests=256, health_check_period_s=10)
class LLMServer:
    """Hosts the engine; session-affine routing sends all of a session's turns here while it lives."""

    def __init__(self, config: dict, replicas_on_node: int = 1) -> None:
        from serving.bootstrap import build_service  # heavy imports happen in the replica

        parsed = Config.model_validate(config)
        configure_logging(parsed.serving.log_format)
        self.replica = _replica_name()
        service = build_service(parsed, replicas_on_node, self.replica)
        service.on_turn = self._record_turn
        self.api = SessionAPI(service, parsed.model.name)
        self._turns: list[TurnSample] = []
        self._inherited_warmups: list[WarmSource] = []
        self._idle_ttl_s = parsed.sessions.idle_ttl_s
        self._janitor: asyncio.Task[None] | None = None
        self._stopped = False
        self._warmup: asyncio.Task[None] | None = None
        if parsed.engine.inherit_warm_sessions > 0:
            self._start_inherited_warmup(service, parsed.engine.inherit_warm_sessions)

    # ---- what needs the KV (history-only operations are the ingress', straight from the store) -------
    async def fork_session(
        self, session_id: str, request: protocol.ForkSessionRequest, owner: str | None
    ) -> Reply[protocol.SessionInfo]:
        return await self._reply(self.api.fork_session(session_id, request, owner))

    # ---- turns ---------------------------------------------------------------------------------------
    async def query(
        self, session_id: str, request: protocol.QueryRequest, owner: str | None
    ) -> Reply[protocol.QueryResponse]:
        return await self._reply(self.api.query(session_id, request, owner))

    async def query_stream(
        self, session_id: str, request: protocol.QueryRequest, owner: str | None
    ) -> AsyncIterator[StreamEvent]:
        """Called with stream=True: Ray awaits this and iterates the stream it returns (no wrapping generator)."""
        return self._stream(self.api.query_stream(session_id, request, owner))

    async def chat_completion(
        self, request: ChatCompletionRequest, session_id: str | None, owner: str | None
    ) -> Reply[ChatCompletionResponse]:
        return await self._reply(self.api.chat_completion(request, session_id, owner))

    async def chat_completion_stream(
        self, request: ChatCompletionRequest, session_id: str | None, owner: str | None
    ) -> AsyncIterator[StreamEvent]:
        return self._stream(self.api.chat_completion_stream(request, session_id, owner))

    async def warm(self, session_id: str, owner: str | None) -> Reply[protocol.WarmResponse]:
        return await self._reply(self.api.warm(session_id, owner))

    async def release_kv(self, session_id: str) -> None:
        """The ingress destroyed, cleared or re-prompted the session in the store: free its KV here."""
        await self.api.release_kv(session_id)

    # ---- health --------------------------------------------------------------------------------------
    async def ready(self) -> str | None:
        """None when this replica can serve turns; otherwise why not (for the ingress' /ready)."""
        return await self.api.not_ready()

    async def check_health(self) -> None:
        """Ray calls this periodically; a replica whose engine failed is reported unhealthy and replaced."""
        problem = self.api.service.engine.health()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> Awaitable[None] | None:
        """Ray Serve calls this on a graceful stop (after the ingress drained) and awaits what it returns: the engine
        writes its sessions' KV to the node's KV dir, so that after a restart their next turns load it instead of
        recomputing. Plain `def`, so that garbage collection calling it again afterwards creates no coroutine."""
        if self._stopped:
            return None
        self._stopped = True
        return self._stop()

    async def _stop(self) -> None:
        for task in (self._janitor, self._warmup):
            if task is not None:
                task.cancel()
        await self.api.service.shutdown()

    # ---- plumbing ------------------------------------------------------------------------------------
    async def _reply(self, call: Awaitable[T]) -> Reply[T]:
        self._start_janitor()
        try:
            value = await call
            return Reply(value=value, replica=self.replica, report=self._report())
        except protocol.APIError as error:
            return Reply(error=error, replica=self.replica, report=self._report())

    async def _stream(self, events: AsyncIterator[T]) -> AsyncIterator[T | str | protocol.APIError | ReplicaReport]:
        self._start_janitor()
        yield self.replica
        try:
            async for event in events:
                yield event
        except protocol.APIError as error:
            yield error
            return
        yield self._report()

    def _record_turn(self, result: TurnResult) -> None:
        decode_tokens = result.completion_tokens - 1
        tpot = (result.total_ms - result.ttft_ms) / decode_tokens if decode_tokens > 0 else None
        self._turns.append(
            TurnSample(
                result.ttft_ms,
                tpot,
                result.prompt_tokens,
                result.cached_tokens,
                result.completion_tokens,
                result.recomputed_tokens,
                result.recompute_reason,
            )
        )
        turn_log.info(
            "turn",
            extra={
                "request_id": _request_id(),
                "session_id": result.session_id or None,  # None: a stateless chat completion
                "replica": self.replica,
                "prompt_tokens": result.prompt_tokens,
                "cached_tokens": result.cached_tokens,
                "kv_source": result.kv_source,
                "completion_tokens": result.completion_tokens,
                "ttft_ms": round(result.ttft_ms, 1),
                "total_ms": round(result.total_ms, 1),
                "finish_reason": result.finish_reason,
            },
        )

    def _report(self) -> ReplicaReport:
        turns, self._turns = self._turns, []
        warmups, self._inherited_warmups = self._inherited_warmups, []
        return ReplicaReport(self.replica, dict(self.api.service.engine.stats()), turns, warmups)

    # ---- sessions inherited from a lost replica ------------------------------------------------------
    def _start_inherited_warmup(self, service: SessionService, limit: int) -> None:
        """Started here, not lazily like the janitor: a replacement replica inherits sessions before any request
        reaches it. Serve runs the constructor on the replica's event loop; outside a replica there is no ring."""
        from serving.server.ring import SessionRing, running_replicas

        try:
            deployment = serve.get_replica_context().replica_id.deployment_id
            loop = asyncio.get_running_loop()
        except (RayServeException, RuntimeError):  # not in a Serve replica (direct instantiation in tests)
            return
        warmup = InheritedWarmup(
            service,
            self.replica,
            running_replicas=lambda: running_replicas(deployment),
            ring=lambda replicas: SessionRing(replicas, deployment).owner,
            limit=limit,
            on_warm=self._record_warmup,
        )
        self._warmup = loop.create_task(warmup.run())

    def _record_warmup(self, result: WarmResult) -> None:
        self._inherited_warmups.append(result.source)

    # ---- idle expiry ---------------------------------------------------------------------------------
    def _start_janitor(self) -> None:
        """Lazily, because the replica's event loop is only known once a request runs."""
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._expire_idle_forever())

    async def _expire_idle_forever(self) -> None:
        period = min(60.0, max(1.0, self._idle_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await asyncio.to_thread(self.api.service.manager.expire_idle)
            except Exception:  # the next sweep retries; a failing store must be visible, not silent
                log.exception("idle-expiry sweep failed")
