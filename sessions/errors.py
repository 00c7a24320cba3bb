"""Typed session errors. Each carries a stable `code` (mapped to HTTP elsewhere) and a message saying what to fix."""

from __future__ import annotations


class SessionError(Exception):
    """Base of every error the sessions package raises on purpose; `code` is stable API, the message is for humans."""

    code: str = "session_error"


class SessionNotFound(SessionError):
    code = "session_not_found"


class SessionExists(SessionError):
    code = "session_exists"


class InvalidRequest(SessionError):
    """Bad messages, roles, ids or parameters: the caller must change the request."""

    code = "invalid_request"


class ContextTooLong(SessionError):
    code = "context_too_long"


class SessionBusy(SessionError):
    code = "session_busy"


class TooManySessions(SessionError):
    code = "too_many_sessions"


class StoreUnavailable(SessionError):
    """The history store is unreachable or timed out. A write is applied whole or not at all; retry later."""

    code = "store_unavailable"
