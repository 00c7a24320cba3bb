"""The histories this process's turns have read, kept so that a session's next turn here reads from the store only
what was appended since (HistoryStore.load's `after`), not the whole conversation again.

A held history is exactly a prefix of the stored one as long as the record's history_id is unchanged: between a
create or clear (each gives a new id) a session's messages are only appended to. So nothing here needs invalidating
for correctness; the store answers the whole history whenever the id moved on, and that answer replaces the entry.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from sessions.messages import Message
from sessions.store import base
from sessions.store.base import HistoryPrefix, SessionRecord

# Sessions whose history is kept (least recently used first out): the text of a few thousand conversations is small
# beside the KV this process keeps for far fewer of them, and a session pushed out just reads its whole history once.
MAX_HELD_SESSIONS = 4096


class HeldHistory(NamedTuple):
    history_id: str
    messages: tuple[Message, ...]

    @property
    def prefix(self) -> HistoryPrefix:
        return HistoryPrefix(self.history_id, len(self.messages))


class HeldHistories:
    """session id -> its history as the last turn here read it (LRU, at most `max_sessions`)."""

    def __init__(self, max_sessions: int = MAX_HELD_SESSIONS) -> None:
        if max_sessions < 0:
            raise ValueError(f"max_sessions must be >= 0, got {max_sessions}")
        self.max_sessions = max_sessions
        self._held: OrderedDict[str, HeldHistory] = OrderedDict()

    def get(self, session_id: str) -> HeldHistory | None:
        """What a turn's load reads on from (`held.prefix`); taken before the load, so an eviction while the load
        runs cannot lose it."""
        return self._held.get(session_id)

    def loaded(
        self, session_id: str, held: HeldHistory | None, record: SessionRecord, messages: list[Message]
    ) -> list[Message]:
        """The whole history, from what a load with `after=held.prefix` (or none) answered; kept for the next turn."""
        history = tuple(messages)
        if held is not None and base.resumes(record.history_id, held.prefix):
            history = (*held.messages, *history)
        self._held.pop(session_id, None)
        if record.history_id and self.max_sessions:  # "" names no history: nothing to resume from
            self._held[session_id] = HeldHistory(record.history_id, history)
            while len(self._held) > self.max_sessions:
                self._held.popitem(last=False)
        return list(history)

    def forget(self, session_id: str) -> None:
        self._held.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._held)
