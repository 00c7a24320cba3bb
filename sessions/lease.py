"""A turn's store lease as an async context manager: taken on entry, renewed while the turn runs, given back on exit.

Store calls go through loop_io.call (a network store may wait for its timeout, never blocking the loop). Cancellation
is handled on both ends: a lease being taken when the turn is cancelled is given back at once instead of blocking the
session for ttl_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from types import TracebackType

from sessions.errors import SessionError
from sessions.store import loop_io
from sessions.store.base import HistoryStore

log = logging.getLogger(__name__)


class TurnLease:
    """`async with TurnLease(store, session_id, ttl_s) as holder:` - SessionBusy/SessionNotFound from the store."""

    def __init__(self, store: HistoryStore, session_id: str, ttl_s: float) -> None:
        self.store = store
        self.session_id = session_id
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex  # one per turn
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        acquiring = asyncio.ensure_future(self._acquire())
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:  # the shielded store call runs on: give back what it may take
            with contextlib.suppress(Exception):
                await acquiring
            await self._release()
            raise
        self._renewer = asyncio.create_task(self._renew_forever())
        return self.holder

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._release()

    async def _acquire(self) -> None:
        await loop_io.call(self.store, self.store.acquire_lease, self.session_id, self.holder, self.ttl_s)

    async def _renew_forever(self) -> None:
        """Keep a long turn's lease alive; a failed renewal is logged and retried (the commit tells if it was lost)."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self._acquire()
            except SessionError as error:
                log.warning("could not renew the turn lease of session %r: %s", self.session_id, error)

    async def _release(self) -> None:
        release = loop_io.call(self.store, self.store.release_lease, self.session_id, self.holder)
        try:  # shielded: a cancelled turn still gives its lease back
            await asyncio.shield(release)
        except Exception as error:  # it lapses by itself after ttl_s
            log.warning("could not release the turn lease of session %r: %s", self.session_id, error)
