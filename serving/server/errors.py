"""Typed exceptions -> HTTP status and error envelope, in one place."""

from __future__ import annotations

from serving.engine.types import EngineFailed
from serving.server.protocol import APIError, ErrorDetail, ErrorResponse
from sessions import errors as session_errors

STATUS_BY_ERROR: dict[type[session_errors.SessionError], int] = {
    session_errors.SessionNotFound: 404,
    session_errors.SessionExists: 409,
    session_errors.SessionBusy: 409,
    session_errors.ContextTooLong: 413,
    session_errors.InvalidRequest: 422,
    session_errors.TooManySessions: 429,
    session_errors.StoreUnavailable: 503,  # code "store_unavailable"
}


def to_api_error(error: Exception) -> APIError:
    """Map any exception to what the client sees; unknown errors are 500s with no internals leaked."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineFailed):
        return APIError(503, "engine_unavailable", str(error))
    if _replica_lost(error):
        return APIError(
            503,
            "replica_unavailable",
            f"the model replica handling this request stopped or cannot be reached ({type(error).__name__}): retry; "
            "another replica takes the session over from its stored history",
        )
    if isinstance(error, session_errors.SessionError):
        status = next((s for cls, s in STATUS_BY_ERROR.items() if isinstance(error, cls)), 400)
        return APIError(status, error.code, str(error))
    return APIError(500, "internal_error", f"the server failed to handle the request ({type(error).__name__})")


def _replica_lost(error: Exception) -> bool:
    """Ray's RayActorError or a subclass (ActorDiedError, ActorUnavailableError), as the ingress' calls to a model
    replica raise them; matched by name, so that this module does not import Ray (LocalClient runs without it)."""
    return any(cls.__name__ == "RayActorError" and cls.__module__ == "ray.exceptions" for cls in type(error).__mro__)


# How long a client should wait before retrying a 503 (draining; engine, store or replica unavailable).
RETRY_AFTER_S = 5


def error_headers(error: APIError) -> dict[str, str] | None:
    return {"retry-after": str(RETRY_AFTER_S)} if error.status == 503 else None


def error_body(error: APIError) -> dict:
    return ErrorResponse(error=ErrorDetail(code=error.code, message=error.message)).model_dump()
