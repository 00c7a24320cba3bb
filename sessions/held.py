"""The histories this process's turns have read, kept so that a session's next turn here reads from the store only
what was appended since (HistoryStore.load's `after`), not the whole conversation again.

A held history is exactly a prefix of the stored one as long as the record's history_id is unchanged: between a
create or clear (each gives a new id) a session's messages are only ever appended to. So nothing here needs
invalidating for correctness; the store answers the whole history whenever the id moved on, and that answer replaces
the entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from sessions.messages import Message
from sessions.store import base
from sessions.store.base import HistoryPrefix, SessionRecord

# What the held histories may take (least recently read out first), as estimated by _size: beside the KV this
# process keeps, the text of its conversations is small, and a session pushed out just reads its history once whole.
MAX_HELD_BYTES = 64 * 2**20
_MESSAGE_OVERHEAD = 120  # bytes a Message costs beyond its text (its object and its two strings' headers, roughly)


def _size(messages: Iterable[Message]) -> int:
    return sum(len(m.content) + _MESSAGE_OVERHEAD for m in messages)


class HeldHistory(NamedTuple):
    history_id: str
    messages: tuple[Message, ...]
    size: int  # _size(messages)

    @property
    def prefix(self) -> HistoryPrefix:
        return HistoryPrefix(self.history_id, len(self.messages))


class HeldHistories:
    """session id -> its history as the last turn here read it (LRU, at most `max_bytes` by _size's estimate).

    Turns use it on the event loop, and the manager's edits (run in worker threads for stores without an asyncio
    driver) forget entries: a lock keeps the size accounting exact."""

    def __init__(self, max_bytes: int = MAX_HELD_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.size = 0
        self._held: OrderedDict[str, HeldHistory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> HeldHistory | None:
        """What a turn's load reads on from (`held.prefix`); taken before the load, so an eviction while the load
        runs cannot lose it."""
        return self._held.get(session_id)

    def loaded(
        self, session_id: str, held: HeldHistory | None, record: SessionRecord, messages: list[Message]
    ) -> list[Message]:
        """The whole history, from what a load with `after=held.prefix` (or none) answered; kept for the next turn."""
        history, size = tuple(messages), _size(messages)
        if held is not None and base.resumes(record.history_id, held.prefix):
            history, size = (*held.messages, *history), held.size + size
        with self._lock:
            self._forget(session_id)
            if record.history_id and size <= self.max_bytes:  # "" names no history: nothing to resume from
                self._held[session_id] = HeldHistory(record.history_id, history, size)
                self.size += size
                while self.size > self.max_bytes:
                    self.size -= self._held.popitem(last=False)[1].size
        return list(history)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        gone = self._held.pop(session_id, None)
        if gone is not None:
            self.size -= gone.size

    def __len__(self) -> int:
        return len(self._held)
