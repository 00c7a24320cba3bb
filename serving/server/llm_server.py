"""The Ray Serve model deployment: one replica = one model + engine + SessionService.

Calls arrive from the ingress through `call` (unary) and `stream` (server-sent tokens). Errors travel
back as values (`Reply`) rather than exceptions, so the ingress never has to unwrap Ray's error types.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from serving.config import Config
from serving.server.api import SessionAPI
from serving.server.protocol import APIError

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


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (direct instantiation in tests)
        return f"pid-{os.getpid()}"


@serve.deployment(name="SessionModel", max_ongoing_requests=256, health_check_period_s=10)
class LLMServer:
    """Hosts the engine; session-affine routing sends all of a session's turns here while it lives."""

    def __init__(self, config: dict) -> None:
        from serving.service import SessionService  # heavy imports happen in the replica

        parsed = Config.model_validate(config)
        if parsed.model.torch_threads == 0:  # Ray pins OMP_NUM_THREADS to num_cpus; match torch to it
            parsed = parsed.model_copy(
                update={
                    "model": parsed.model.model_copy(
                        update={"torch_threads": max(1, int(parsed.serving.cpus_per_replica))}
                    )
                }
            )
        self.api = SessionAPI(SessionService.from_config(parsed), parsed.model.name)
        self.replica = _replica_name()

    async def call(self, method: str, *args: Any) -> Reply:
        if method not in _UNARY_METHODS:
            return Reply(error=APIError(404, "unknown_method", f"no such operation: {method}"))
        try:
            return Reply(value=await getattr(self.api, method)(*args), replica=self.replica)
        except APIError as error:
            return Reply(error=error, replica=self.replica)

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """Yields the replica name, then the stream's events; an APIError, if any, is the last item."""
        yield self.replica
        if method not in _STREAM_METHODS:
            yield APIError(404, "unknown_method", f"no such stream: {method}")
            return
        try:
            async for event in getattr(self.api, method)(*args):
                yield event
        except APIError as error:
            yield error

    async def check_health(self) -> None:
        """Ray calls this periodically; a replica whose engine thread died is restarted."""
        engine = self.api.service.engine
        healthy = getattr(engine, "healthy", None)
        if healthy is not None and not healthy():
            raise RuntimeError("engine loop is not running")
