"""What a history store keeps and the protocol every backend implements, so the manager never knows which one it has."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sessions.errors import InvalidRequest, SessionNotFound
from sessions.messages import Message


@dataclass(slots=True)
class SessionRecord:
    """A session's fixed facts. The system prompt lives here, not among the messages, so trimming can never drop it."""

    session_id: str
    system_prompt: str | None
    metadata: dict
    created_at: float
    last_active_at: float
    owner: str | None = None


class HistoryStore(Protocol):
    """Durable (or not) session records plus their ordered messages. Every method is safe to call from any thread."""

    def create(self, record: SessionRecord) -> None:
        """Store a new record; SessionExists if the id is taken."""
        ...

    def get(self, session_id: str) -> SessionRecord | None:
        """A copy of the record, or None; mutating it does not change the store."""
        ...

    def delete(self, session_id: str) -> bool:
        """Delete the record and its messages; False if there was nothing to delete."""
        ...

    def append(self, session_id: str, messages: Sequence[Message], now: float) -> None:
        """Append all messages or none, and set last_active_at; SessionNotFound if the session is missing."""
        ...

    def messages(self, session_id: str, window: int | None = None) -> list[Message]:
        """The last `window` messages (all if None), oldest first, no system prompt; SessionNotFound if missing."""
        ...

    def message_count(self, session_id: str) -> int:
        """How many messages are stored; SessionNotFound if missing."""
        ...

    def clear(self, session_id: str) -> None:
        """Delete the messages, keep the record (and so the system prompt); SessionNotFound if missing."""
        ...

    def touch(self, session_id: str, now: float) -> None:
        """Set last_active_at; SessionNotFound if missing."""
        ...

    def count(self) -> int:
        """How many sessions exist."""
        ...

    def idle_since(self, before: float) -> list[str]:
        """Ids of sessions whose last_active_at < before, least recently active first."""
        ...

    def missing(self, session_ids: Sequence[str]) -> list[str]:
        """Those of `session_ids` that have no record, in the given order (one query, not one per id)."""
        ...

    def close(self) -> None:
        """Release resources; the store is unusable afterwards."""
        ...


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Refuse a batch containing anything but Messages before a backend writes any of it."""
    batch = list(messages)
    for index, message in enumerate(batch):
        if not isinstance(message, Message):
            raise TypeError(f"messages[{index}] is a {type(message).__name__}, not a Message: parse it first")
    return batch


def check_window(window: int | None) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise InvalidRequest(f"window must be a whole number >= 1 (or omitted for all messages), got {window!r}")


def not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"no session {session_id!r}: check the id, or create the session first")
