"""The Ray Serve model deployment: one replica = one model + engine + SessionService.

Calls arrive from the ingress through `call` (unary) and `stream` (server-sent tokens). Errors travel
back as values (`Reply`) rather than exceptions, so the ingress never has to unwrap Ray's error types;
every reply also carries this replica's metrics report for the ingress' /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from serving.config import Config
from serving.server.api import SessionAPI
from serving.server.metrics import ReplicaReport, TurnSample
from serving.server.protocol import APIError
from serving.service import TurnResult

log = logging.getLogger(__name__)

_UNARY_METHODS = frozenset(
    {
        "create_session",
        "get_session",
        "destroy_session",
        "fork_session",
        "query",
        "messages",
        "append",
        "clear",
        "chat_completion",
    }
)
_STREAM_METHODS = frozenset({"query_stream", "chat_completion_stream"})


@dataclass(frozen=True, slots=True)
class Reply:
    """A unary call's outcome: a protocol model (or None), or an error with its HTTP status."""

    value: Any = None
    error: APIError | None = None
    replica: str = ""
    report: ReplicaReport | None = None


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (direct instantiation in tests)
        return f"pid-{os.getpid()}"


def _with_replica_threads(config: Config) -> Config:
    """Ray pins OMP_NUM_THREADS to the replica's num_cpus; unless configured, give torch that many threads."""
    if config.model.torch_threads:
        return config
    threads = max(1, int(config.serving.cpus_per_replica))
    return config.model_copy(update={"model": config.model.model_copy(update={"torch_threads": threads})})


@serve.deployment(name="SessionModel", max_ongoing_requests=256, health_check_period_s=10)
class LLMServer:
    """Hosts the engine; session-affine routing sends all of a session's turns here while it lives."""

    def __init__(self, config: dict) -> None:
        from serving.service import SessionService  # heavy imports happen in the replica

        parsed = _with_replica_threads(Config.model_validate(config))
        service = SessionService.from_config(parsed)
        service.on_turn = self._record_turn
        self.api = SessionAPI(service, parsed.model.name)
        self.replica = _replica_name()
        self._turns: list[TurnSample] = []
        self._idle_ttl_s = parsed.sessions.idle_ttl_s
        self._janitor: asyncio.Task | None = None

    async def call(self, method: str, *args: Any) -> Reply:
        self._start_janitor()
        if method not in _UNARY_METHODS:
            return Reply(error=APIError(404, "unknown_method", f"no such operation: {method}"))
        try:
            value = await getattr(self.api, method)(*args)
            return Reply(value=value, replica=self.replica, report=self._report())
        except APIError as error:
            return Reply(error=error, replica=self.replica, report=self._report())

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """Yields the replica name, the stream's events, then a ReplicaReport; an APIError ends it early."""
        self._start_janitor()
        yield self.replica
        if method not in _STREAM_METHODS:
            yield APIError(404, "unknown_method", f"no such stream: {method}")
            return
        try:
            async for event in getattr(self.api, method)(*args):
                yield event
        except APIError as error:
            yield error
            return
        yield self._report()

    async def check_health(self) -> None:
        """Ray calls this periodically; a replica whose engine loop died is replaced."""
        healthy = getattr(self.api.service.engine, "healthy", None)
        if healthy is not None and not healthy():
            raise RuntimeError("engine loop is not running")

    # ---- metrics -----------------------------------------------------------------------------------
    def _record_turn(self, result: TurnResult) -> None:
        decode_tokens = result.completion_tokens - 1
        tpot = (result.total_ms - result.ttft_ms) / decode_tokens if decode_tokens > 0 else None
        self._turns.append(
            TurnSample(result.ttft_ms, tpot, result.prompt_tokens, result.cached_tokens, result.completion_tokens)
        )

    def _report(self) -> ReplicaReport:
        turns, self._turns = self._turns, []
        gauges = dict(self.api.service.engine.stats())
        gauges["live_sessions"] = self.api.service.manager.count()
        return ReplicaReport(self.replica, gauges, turns)

    # ---- idle expiry -------------------------------------------------------------------------------
    def _start_janitor(self) -> None:
        """Lazily, because the replica's event loop is only known once a request runs."""
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._expire_idle_forever())

    async def _expire_idle_forever(self) -> None:
        period = min(60.0, max(1.0, self._idle_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                expired = self.api.service.manager.expire_idle()
                if expired:
                    log.info("expired %d idle sessions", len(expired))
