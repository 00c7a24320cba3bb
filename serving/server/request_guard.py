"""The ingress' outermost step for every HTTP request: refuse oversized bodies, count requests by route and status.

A plain ASGI middleware, not Starlette's `@app.middleware("http")`: that one runs each request through an extra
task group and memory streams, and re-wraps `receive` for a request with a body; without it `/health` served ~40%
more requests per second and the session operations 10–30% more (`benchmarks/control_plane.py`;
`docs/control-plane-measurements.md`, "Direct ingress").
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.server import metrics, protocol
from serving.server.errors import error_body

MAX_BODY_BYTES = 8 * 2**20


def _too_large() -> JSONResponse:
    error = protocol.APIError(
        413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes: send a smaller request"
    )
    return JSONResponse(error_body(error), status_code=413)


def _declared_length(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body of a request sent without Content-Length; None as soon as it passes MAX_BODY_BYTES."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the route will see an empty body and no one reads
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the route the buffered body first, then whatever the connection says (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class RequestGuard:
    """413 `body_too_large` for a body over MAX_BODY_BYTES, declared (Content-Length) or chunked (buffered and
    counted before the route runs, so nothing is stored from it); `sessionserve_requests_total{route, status}` for
    every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _declared_length(scope)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await self._answer(_too_large(), scope, receive, send)
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):  # chunked: count it before the route
            buffered = await _read_body(receive)
            if buffered is None:
                await self._answer(_too_large(), scope, receive, send)
                return
            receive = _replay(buffered, receive)
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                route = scope.get("route")  # set by the router before any response starts
                metrics.METRICS.observe_request(getattr(route, "path", "unmatched"), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            if not started:
                metrics.METRICS.observe_request("unmatched", 500)
            raise

    @staticmethod
    async def _answer(response: JSONResponse, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.METRICS.observe_request("unmatched", response.status_code)
        await response(scope, receive, send)
