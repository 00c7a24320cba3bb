"""Thin FastAPI routes on a CPU-only ingress deployment; each call goes to the model deployment
with `session_id` set, so Ray routes every turn of a session to the replica holding its KV. With
`serving.ingress: replica` the same routes run in the one model replica and call its LLMServer in-process.

The ingress also owns the service's lifecycle as seen from outside: `/ready` (every model replica loaded,
the store answering) and `drain` (called on SIGTERM: refuse new turns, let running ones finish, cancel the rest).
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from serving.config import Config
from serving.logs import configure_logging
from serving.server import auth, metrics, protocol
from serving.server.api import HistoryAPI
from serving.server.auth import Owner
from serving.server.control_plane import ReplicaKV, ingress_history
from serving.server.errors import error_body, error_headers, to_api_error
from serving.server.in_process_model import InProcessModel
from serving.server.llm_server import LLMServer, Reply
from serving.server.metrics import ReplicaReport
from serving.server.openai_protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList
from serving.server.request_guard import RequestGuard

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-sessionserve-replica"
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": protocol.ErrorResponse} for status in (401, 404, 409, 413, 422, 429, 503)
}
MODEL_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "Ingress"
T = TypeVar("T")

app = FastAPI(title="sessionserve", version="0.1.0", description="Chat sessions with server-side history and KV.")
app.add_middleware(RequestGuard)  # 413 for oversized bodies, requests counted by route and status
# The web chat page: plain files shipped as package data (serving/server/static/), open without a key (the page asks
# for one when the API answers 401). The API stays under /v1.
WEB_DIR = Path(__file__).parent / "static"
app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


@app.exception_handler(protocol.APIError)
async def _api_error(_: Request, error: protocol.APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error_headers(error))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods, unparsable bodies: the same envelope as every other error."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
    body = error_body(protocol.APIError(error.status_code, code, str(error.detail)))
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems[:10])
    return JSONResponse(error_body(protocol.APIError(422, "invalid_request", message)), status_code=422)


def _session_sse(event: Any) -> str:
    """Our stream: `event: delta` {text} pieces, then `event: done` {QueryResponse} (or `event: error`)."""
    if isinstance(event, str):
        name, data = "delta", {"text": event}
    elif isinstance(event, protocol.APIError):
        name, data = "error", error_body(event)
    else:
        name, data = "done", event.model_dump()
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _openai_sse(event: Any) -> str:
    """OpenAI's stream: `data: {chunk}` lines; the last chunk carries usage, then `data: [DONE]`."""
    if isinstance(event, protocol.APIError):
        return f"data: {json.dumps(error_body(event))}\n\n"
    text = f"data: {event.model_dump_json(exclude_none=True)}\n\n"
    return text + "data: [DONE]\n\n" if event.choices[0].finish_reason else text


def _model_deployment_problem() -> str | None:
    """Why the model deployment is not fully up (replicas still loading, unhealthy), or None."""
    context = serve.get_replica_context()
    application = serve.status().applications.get(context.app_name)
    deployment = application.deployments.get(MODEL_DEPLOYMENT) if application else None
    if deployment is None:
        return "the model deployment is not running"
    if deployment.status != "HEALTHY":
        states = ", ".join(f"{count} {state}" for state, count in deployment.replica_states.items()) or "none"
        return f"model replicas are not all ready ({deployment.status}; replicas: {states})"
    return None


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=1024)  # its resources: builder.build_app
@serve.ingress(app)
class Ingress:
    """Authenticate, validate, route by session, translate errors, drain; the model is elsewhere (or, with
    `serving.ingress: replica`, in this replica: `model` None).

    (No `from __future__ import annotations` in this module: Ray rewrites the route signatures at runtime.)
    """

    def __init__(self, model: DeploymentHandle | None, config: dict, api_keys: tuple[str, ...] = ()) -> None:
        """`model` None: `serving.ingress: replica`, this replica loads the model and calls it in-process."""
        parsed = Config.model_validate(config)
        configure_logging(parsed.serving.log_format)
        self.model_name = parsed.model.name
        auth.configure(api_keys)
        self.draining = False
        self._in_flight: set[Any] = set()  # DeploymentResponse(Generator)s, or their in-process equivalents
        self._local: LLMServer | None = None
        self._replica_kv: ReplicaKV | None = None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._ingress_handle: DeploymentHandle | None = None  # this deployment's, once it knows every replica
        if model is None:
            self._local = LLMServer.func_or_class(config)
            self.model: Any = InProcessModel(self._local)
            self.history: HistoryAPI = self._local.api  # its own store and KV: a destroy frees the KV right here
        else:
            # Calls go straight to the replicas' gRPC servers, not through Ray's actor calls and object store (Ray's
            # RAY_SERVE_THROUGHPUT_OPTIMIZED does the same; README "HTTP + Ray over the in-process path"). An option
            # of the handle, which the driver built: the ingress process' environment does not reach it.
            self.model = model = model.options(_by_reference=False)
            # History-only operations are served here, straight from the shared store (serving/server/control_plane.py).
            self.history, self._replica_kv = ingress_history(parsed, model)

    def _model(self, session_id: str | None, stream: bool = False) -> DeploymentHandle:
        """Route by session (consistent hashing); session-less calls spread over replicas."""
        if session_id:
            return self.model.options(stream=stream, session_id=session_id)
        return self.model.options(stream=stream)

    def _admit(self) -> None:
        if self.draining:
            raise protocol.APIError(
                503, "draining", "the server is shutting down: retry against another instance or later"
            )

    def _sessions(self) -> HistoryAPI:
        """The ingress' HistoryAPI, once its KV releases know the event loop to send them from."""
        if self._replica_kv is not None and self._replica_kv.loop is None:
            self._replica_kv.loop = asyncio.get_running_loop()
        return self.history

    async def _unary(self, call: "Awaitable[Reply[T]]", response: Response | None = None) -> T:
        """Await a model call (tracked, so a drain can wait for it or cancel it); its error becomes ours."""
        self._in_flight.add(call)
        try:
            reply = await call
        except Exception as error:  # Ray's own, such as the replica having died: the error envelope all the same
            raise to_api_error(error) from error
        finally:
            self._in_flight.discard(call)
        metrics.METRICS.observe_report(reply.report)
        if reply.error is not None:
            raise reply.error
        if response is not None:
            response.headers[REPLICA_HEADER] = reply.replica
        return reply.value  # type: ignore[return-value]  # None only for operations typed Reply[None]

    async def _stream(self, events: DeploymentResponseGenerator, sse: Callable[[Any], str]) -> Response:
        """Start a stream on the model; an error before the first event is a plain HTTP error, later ones SSE."""
        self._in_flight.add(events)
        try:
            replica = await events.__anext__()
            first = await events.__anext__()
        except BaseException as error:
            self._in_flight.discard(events)
            if isinstance(error, Exception):  # not a cancellation (a drain's): Ray's errors get the envelope too
                raise to_api_error(error) from error
            raise
        if isinstance(first, protocol.APIError):
            self._in_flight.discard(events)
            raise first

        async def body_stream() -> AsyncIterator[str]:
            try:
                yield sse(first)
                async for event in events:
                    if isinstance(event, ReplicaReport):
                        metrics.METRICS.observe_report(event)
                    else:
                        yield sse(event)
            except Exception as error:  # the replica stopped mid-stream: an error event ends it, not a cut connection
                yield sse(to_api_error(error))
            finally:
                self._in_flight.discard(events)

        headers = {REPLICA_HEADER: replica, "cache-control": "no-cache"}
        return StreamingResponse(body_stream(), media_type="text/event-stream", headers=headers)

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def drain(self, grace_s: float) -> dict[str, int]:
        """Refuse new turns (503 + Retry-After), wait up to `grace_s` for running calls, cancel the rest.

        A cancelled turn is never committed: the model replica commits a turn only when generation finishes.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cancelled = list(self._in_flight)
        for call in cancelled:
            call.cancel()
        return {"cancelled": len(cancelled)}

    async def check_health(self) -> None:
        """Ray asks periodically; with the model in this replica, a failed engine makes it unhealthy (replaced)."""
        if self._local is not None:
            await self._local.check_health()

    async def __del__(self) -> None:
        """A graceful stop: with the model in this replica, its sessions' KV is written to disk (LLMServer's)."""
        stopping = self._local.__del__() if getattr(self, "_local", None) is not None else None
        if stopping is not None:
            await stopping

    @app.get("/", include_in_schema=False)
    async def chat_page(self, request: Request) -> Response:
        """The web chat page. Under a route prefix, `/prefix` redirects to `/prefix/` so its relative URLs resolve
        (a relative Location, so it holds behind a proxy that rewrites the scheme or host)."""
        path = request.url.path
        if not path.endswith("/"):
            return RedirectResponse(path.rsplit("/", 1)[-1] + "/")
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: this process answers. Readiness is /ready."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": protocol.ErrorResponse}})
    async def ready(self) -> dict:
        """200 only when every model replica has loaded its model and can reach the store; 503 says why not."""
        if self.draining:
            raise protocol.APIError(503, "draining", "the server is shutting down")
        problem = None if self._local is not None else await asyncio.to_thread(_model_deployment_problem)
        if problem is None:
            problem = await self.history.store_problem()
        if problem is None:
            try:
                problem = await self.model.ready.remote()
            except Exception as error:  # no replica answers (one died, say): not ready, as a 503 that says so
                problem = f"a model replica does not answer: {to_api_error(error).message}"
        if problem is not None:
            raise protocol.APIError(503, "not_ready", problem)
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        """Prometheus text format: requests/errors by route, TTFT/TPOT, tokens, engine gauges, live sessions; the
        numbers of every ingress replica, added up."""
        with contextlib.suppress(Exception):  # a metric must never fail the scrape
            metrics.METRICS.live_sessions.set(await self.history.manager.store_call(self.history.manager.count))
        snapshots = [metrics.METRICS.snapshot(self.replica_id), *await self._other_replicas_snapshots()]
        return Response(metrics.render(snapshots), media_type=CONTENT_TYPE_LATEST)

    async def metrics_snapshot(self) -> metrics.MetricsSnapshot:
        """This replica's numbers, for the ingress replica that answers a scrape."""
        return metrics.METRICS.snapshot(self.replica_id)

    async def _other_replicas_snapshots(self) -> list[metrics.MetricsSnapshot]:
        """The other ingress replicas' numbers (with the model in this replica, there are none). When one does not
        answer in time, this scrape has only this replica's (the `sessionserve_ingress_replicas` gauge says so)."""
        if self._local is not None:
            return []
        try:
            if self._ingress_handle is None:  # a broadcast goes to the replicas the handle knows of; a routed call
                context = serve.get_replica_context()  # first waits until it knows them
                handle = serve.get_deployment_handle(context.deployment, context.app_name)
                await handle.metrics_snapshot.remote()
                self._ingress_handle = handle
            answers = await self._ingress_handle.broadcast("metrics_snapshot").results_async(timeout_s=5)
        except Exception as error:
            log.warning("/metrics: the other ingress replicas' numbers are left out: %s", error)
            return []
        return [answer for answer in answers if answer.replica != self.replica_id]

    # ---- sessions ------------------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, response_model=protocol.SessionInfo, responses=ERRORS)
    async def create_session(self, body: protocol.CreateSessionRequest, owner: Owner) -> protocol.SessionInfo:
        self._admit()
        return await self._sessions().create_session(body, owner)

    @app.get("/v1/sessions", response_model=protocol.SessionList, responses=ERRORS)
    async def list_sessions(
        self,
        owner: Owner,
        limit: Annotated[int, Query(ge=1, le=1000, description="sessions per page")] = 50,
        offset: Annotated[int, Query(ge=0, description="sessions to skip (next_offset of the previous page)")] = 0,
    ) -> protocol.SessionList:
        """The caller's sessions, most recently active first."""
        return await self._sessions().list_sessions(limit, offset, owner)

    @app.get("/v1/sessions/{session_id}", response_model=protocol.SessionInfo, responses=ERRORS)
    async def get_session(self, session_id: str, owner: Owner) -> protocol.SessionInfo:
        return await self._sessions().get_session(session_id, owner)

    @app.patch("/v1/sessions/{session_id}", response_model=protocol.SessionInfo, responses=ERRORS)
    async def update_session(
        self, session_id: str, body: protocol.UpdateSessionRequest, owner: Owner
    ) -> protocol.SessionInfo:
        """Set the system prompt and/or replace the metadata; fields left out stay as they are."""
        return await self._sessions().update_session(session_id, body, owner)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def destroy_session(self, session_id: str, owner: Owner) -> Response:
        await self._sessions().destroy_session(session_id, owner)
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/fork", status_code=201, response_model=protocol.SessionInfo, responses=ERRORS)
    async def fork_session(
        self, session_id: str, body: protocol.ForkSessionRequest, response: Response, owner: Owner
    ) -> protocol.SessionInfo:
        self._admit()
        return await self._unary(self._model(session_id).fork_session.remote(session_id, body, owner), response)

    @app.post("/v1/sessions/{session_id}/query", response_model=protocol.QueryResponse, responses=ERRORS)
    async def query(self, session_id: str, body: protocol.QueryRequest, response: Response, owner: Owner) -> Any:
        self._admit()
        if body.stream:
            events = self._model(session_id, stream=True).query_stream.remote(session_id, body, owner)
            return await self._stream(events, _session_sse)
        return await self._unary(self._model(session_id).query.remote(session_id, body, owner), response)

    @app.post("/v1/sessions/{session_id}/warm", response_model=protocol.WarmResponse, responses=ERRORS)
    async def warm(self, session_id: str, response: Response, owner: Owner) -> protocol.WarmResponse:
        """Bring the session's KV to the device of its replica ahead of its next turn (from host, disk or history)."""
        self._admit()
        return await self._unary(self._model(session_id).warm.remote(session_id, owner), response)

    @app.get("/v1/sessions/{session_id}/messages", response_model=protocol.MessagesResponse, responses=ERRORS)
    async def messages(
        self,
        session_id: str,
        owner: Owner,
        window: Annotated[int | None, Query(ge=1, description="last N messages")] = None,
    ) -> protocol.MessagesResponse:
        return await self._sessions().messages(session_id, window, owner)

    @app.post("/v1/sessions/{session_id}/messages", response_model=protocol.MessagesResponse, responses=ERRORS)
    async def append(self, session_id: str, body: protocol.AppendRequest, owner: Owner) -> protocol.MessagesResponse:
        """Append messages without generating. Answers the messages as stored, not the whole history (GET reads it),
        so an append costs the same however long the conversation is."""
        return await self._sessions().append(session_id, body, owner)

    @app.delete("/v1/sessions/{session_id}/messages", status_code=204, responses=ERRORS)
    async def clear(self, session_id: str, owner: Owner) -> Response:
        await self._sessions().clear(session_id, owner)
        return Response(status_code=204)

    # ---- OpenAI --------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(
        self,
        body: ChatCompletionRequest,
        response: Response,
        owner: Owner,
        x_session_id: Annotated[str | None, Header()] = None,
    ) -> Any:
        """OpenAI-compatible. With `x-session-id`, the messages are that session's new turn(s)."""
        self._admit()
        if body.stream:
            events = self._model(x_session_id, stream=True).chat_completion_stream.remote(body, x_session_id, owner)
            return await self._stream(events, _openai_sse)
        call = self._model(x_session_id).chat_completion.remote(body, x_session_id, owner)
        return await self._unary(call, response)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self, owner: Owner) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])
