"""Thin FastAPI routes on a CPU-only ingress deployment; each call goes to the model deployment
with `session_id` set, so Ray routes every turn of a session to the replica holding its KV."""

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.server import metrics
from serving.server.auth import Authenticator
from serving.server.errors import error_body
from serving.server.metrics import ReplicaReport
from serving.server.openai_protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList
from serving.server.protocol import (
    APIError,
    AppendRequest,
    CreateSessionRequest,
    ErrorResponse,
    ForkSessionRequest,
    MessagesResponse,
    QueryRequest,
    QueryResponse,
    SessionInfo,
)

REPLICA_HEADER = "x-sessionserve-replica"
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 404, 409, 413, 422, 429)
}

MAX_BODY_BYTES = 8 * 2**20

app = FastAPI(title="sessionserve", version="0.1.0", description="Chat sessions with server-side history and KV.")


@app.middleware("http")
async def _limit_and_count(request: Request, call_next: Callable) -> Response:
    """Refuse oversized bodies before reading them, and count every request by route template and status."""
    length = request.headers.get("content-length")
    too_big = length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES)
    if length is None and request.method in ("POST", "PUT", "PATCH"):  # chunked: count while reading
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                too_big = True
                break
        request._body = bytes(body)  # Starlette hands the buffered body to the route
    if too_big:
        error = APIError(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes: send a smaller request")
        response: Response = JSONResponse(error_body(error), status_code=413)
    else:
        response = await call_next(request)
    route = request.scope.get("route")
    metrics.METRICS.observe_request(getattr(route, "path", "unmatched"), response.status_code)
    return response


@app.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods, unparsable bodies: the same envelope as every other error."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
    body = error_body(APIError(error.status_code, code, str(error.detail)))
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems[:10])
    return JSONResponse(error_body(APIError(422, "invalid_request", message)), status_code=422)


def _session_sse(event: Any) -> str:
    """Our stream: `event: delta` {text} pieces, then `event: done` {QueryResponse} (or `event: error`)."""
    if isinstance(event, str):
        name, data = "delta", {"text": event}
    elif isinstance(event, APIError):
        name, data = "error", error_body(event)
    else:
        name, data = "done", event.model_dump()
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _openai_sse(event: Any) -> str:
    """OpenAI's stream: `data: {chunk}` lines; the last chunk carries usage, then `data: [DONE]`."""
    if isinstance(event, APIError):
        return f"data: {json.dumps(error_body(event))}\n\n"
    text = f"data: {event.model_dump_json(exclude_none=True)}\n\n"
    return text + "data: [DONE]\n\n" if event.choices[0].finish_reason else text


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    """No model here: authenticate, validate, route by session, translate errors.

    (No `from __future__ import annotations` in this module: Ray rewrites the route signatures at runtime.)
    """

    def __init__(self, model: DeploymentHandle, model_name: str, api_keys: tuple[str, ...] = ()) -> None:
        self.model = model
        self.model_name = model_name
        self.auth = Authenticator(api_keys)

    def _handle(self, session_id: str | None, stream: bool = False) -> DeploymentHandle:
        """Route by session (consistent hashing); session-less calls spread over replicas."""
        return (
            self.model.options(stream=stream, session_id=session_id)
            if session_id
            else self.model.options(stream=stream)
        )

    async def _call(self, session_id: str | None, method: str, *args: Any, response: Response | None = None) -> Any:
        reply = await self._handle(session_id).call.remote(method, *args)
        metrics.METRICS.observe_report(reply.report)
        if reply.error is not None:
            raise reply.error
        if response is not None:
            response.headers[REPLICA_HEADER] = reply.replica
        return reply.value

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        """Prometheus text format: requests/errors by route, TTFT/TPOT, tokens, per-replica engine gauges."""
        return Response(metrics.METRICS.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/sessions", status_code=201, response_model=SessionInfo, responses=ERRORS)
    async def create_session(
        self, body: CreateSessionRequest, response: Response, authorization: Annotated[str | None, Header()] = None
    ) -> SessionInfo:
        owner = self.auth.owner(authorization)
        if body.session_id is None:  # pick the id here so creation already routes like the session's turns
            body = body.model_copy(update={"session_id": uuid.uuid4().hex})
        return await self._call(body.session_id, "create_session", body, owner, response=response)

    @app.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=ERRORS)
    async def get_session(
        self, session_id: str, response: Response, authorization: Annotated[str | None, Header()] = None
    ) -> SessionInfo:
        owner = self.auth.owner(authorization)
        return await self._call(session_id, "get_session", session_id, owner, response=response)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def destroy_session(self, session_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        owner = self.auth.owner(authorization)
        done = Response(status_code=204)
        await self._call(session_id, "destroy_session", session_id, owner, response=done)
        return done

    @app.post("/v1/sessions/{session_id}/fork", status_code=201, response_model=SessionInfo, responses=ERRORS)
    async def fork_session(
        self,
        session_id: str,
        body: ForkSessionRequest,
        response: Response,
        authorization: Annotated[str | None, Header()] = None,
    ) -> SessionInfo:
        owner = self.auth.owner(authorization)
        return await self._call(session_id, "fork_session", session_id, body, owner, response=response)

    @app.post("/v1/sessions/{session_id}/query", response_model=QueryResponse, responses=ERRORS)
    async def query(
        self,
        session_id: str,
        body: QueryRequest,
        response: Response,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Any:
        owner = self.auth.owner(authorization)
        if body.stream:
            return await self._stream(session_id, "query_stream", session_id, body, owner, sse=_session_sse)
        return await self._call(session_id, "query", session_id, body, owner, response=response)

    async def _stream(self, session_id: str | None, method: str, *args: Any, sse: Callable[[Any], str]) -> Response:
        """Start a stream on the model; an error before the first event is a plain HTTP error, later ones SSE."""
        handle = (
            self.model.options(stream=True, session_id=session_id) if session_id else self.model.options(stream=True)
        )
        events = handle.stream.remote(method, *args)
        replica = await events.__anext__()
        first = await events.__anext__()
        if isinstance(first, APIError):
            raise first

        async def body_stream() -> AsyncIterator[str]:
            yield sse(first)
            async for event in events:
                if isinstance(event, ReplicaReport):
                    metrics.METRICS.observe_report(event)
                else:
                    yield sse(event)

        headers = {REPLICA_HEADER: replica, "cache-control": "no-cache"}
        return StreamingResponse(body_stream(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(
        self,
        body: ChatCompletionRequest,
        response: Response,
        authorization: Annotated[str | None, Header()] = None,
        x_session_id: Annotated[str | None, Header()] = None,
    ) -> Any:
        """OpenAI-compatible. With `x-session-id`, the messages are that session's new turn(s)."""
        owner = self.auth.owner(authorization)
        if body.stream:
            return await self._stream(
                x_session_id, "chat_completion_stream", body, x_session_id, owner, sse=_openai_sse
            )
        return await self._call(x_session_id, "chat_completion", body, x_session_id, owner, response=response)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self, authorization: Annotated[str | None, Header()] = None) -> ModelList:
        self.auth.owner(authorization)
        return ModelList(data=[ModelCard(id=self.model_name)])

    @app.get("/v1/sessions/{session_id}/messages", response_model=MessagesResponse, responses=ERRORS)
    async def messages(
        self,
        session_id: str,
        response: Response,
        window: Annotated[int | None, Query(ge=1, description="last N messages")] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> MessagesResponse:
        owner = self.auth.owner(authorization)
        return await self._call(session_id, "messages", session_id, window, owner, response=response)

    @app.post("/v1/sessions/{session_id}/messages", response_model=MessagesResponse, responses=ERRORS)
    async def append(
        self,
        session_id: str,
        body: AppendRequest,
        response: Response,
        authorization: Annotated[str | None, Header()] = None,
    ) -> MessagesResponse:
        owner = self.auth.owner(authorization)
        return await self._call(session_id, "append", session_id, body, owner, response=response)

    @app.delete("/v1/sessions/{session_id}/messages", status_code=204, responses=ERRORS)
    async def clear(self, session_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        owner = self.auth.owner(authorization)
        done = Response(status_code=204)
        await self._call(session_id, "clear", session_id, owner, response=done)
        return done
