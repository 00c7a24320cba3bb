"""Typed session errors. Each carries a stable `code` (mapped to HTTP elsewhere) and a message saying what to fix."""

from __future__ import annotations

from typing import Any


class SessionError(Exception):
    """Base of every error the sessions package raises on purpose; `code` is stable API, the message is for humans.

    A subclass names its code in its header, `class SessionNotFound(SessionError, code="session_not_found")`;
    one that names none keeps its parent's.
    """

    code: str = "session_error"

    def __init_subclass__(cls, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class SessionNotFound(SessionError, code="session_not_found"):
    """No session has this id, or the caller may not see it (the two are indistinguishable on purpose)."""


class SessionExists(SessionError, code="session_exists"):
    """The id asked for at creation is taken."""


class InvalidRequest(SessionError, code="invalid_request"):
    """Bad messages, roles, ids or parameters: the caller must change the request."""


class ContextTooLong(SessionError, code="context_too_long"):
    """The prompt does not fit the model's context, even after trimming the history."""


class SessionBusy(SessionError, code="session_busy"):
    """Another turn holds the session (its lease): wait for it to finish and retry."""


class TooManySessions(SessionError, code="too_many_sessions"):
    """The server holds its maximum number of sessions."""


class StoreUnavailable(SessionError, code="store_unavailable"):
    """The history store is unreachable or timed out. A write is applied whole or not at all; retry later."""
