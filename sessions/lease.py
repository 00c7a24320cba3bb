"""A turn's store lease as an async context manager: taken with the session's load on entry, renewed while the turn
runs, given back on exit unless the turn's commit gave it back in its own write.

That makes a turn two store round trips (load with the lease, commit with the release) where it was four. Store calls
go through loop_io.call (a network store may wait for its timeout, never blocking the loop). Cancellation is handled
on both ends: a lease being taken when the turn is cancelled is given back at once instead of blocking the session
for ttl_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from types import TracebackType

from sessions.errors import SessionError
from sessions.messages import Message
from sessions.store import loop_io
from sessions.store.base import HistoryPrefix, HistoryStore, Lease, Owner, SessionRecord

log = logging.getLogger(__name__)


class TurnLease:
    """`async with TurnLease(store, session_id, ttl_s, owner, after) as (record, messages):` - the session's record and
    its messages (past `after`, the caller's held prefix, if the history is still that one: see HistoryStore.load),
    read with the lease taken; SessionBusy/SessionNotFound from the store."""

    def __init__(
        self,
        store: HistoryStore,
        session_id: str,
        ttl_s: float,
        owner: Owner = None,
        after: HistoryPrefix | None = None,
    ) -> None:
        self.store = store
        self.session_id = session_id
        self.owner = owner
        self.after = after
        self.lease = Lease(uuid.uuid4().hex, ttl_s)  # one holder per turn
        self._renewer: asyncio.Task[None] | None = None
        self._ending = asyncio.Event()
        self._held = False

    @property
    def holder(self) -> str:
        return self.lease.holder

    async def __aenter__(self) -> tuple[SessionRecord, list[Message]]:
        loading = asyncio.ensure_future(
            loop_io.call(
                self.store, self.store.load, self.session_id, owner=self.owner, lease=self.lease, after=self.after
            )
        )
        try:
            loaded = await asyncio.shield(loading)
        except asyncio.CancelledError:  # the shielded store call runs on: give back what it may take
            with contextlib.suppress(Exception):
                await loading
            await self._release()
            raise
        self._held = True
        self._renewer = asyncio.create_task(self._renew_until_ending())
        return loaded

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._ending.set()
        if self._held:
            await self._release()

    async def ending(self) -> None:
        """Stop renewing, waiting out a renewal already sent: call it before a commit that gives the lease back, so
        no renewal can take the lease again after that commit. (A cancelled caller leaves that renewal running.)"""
        self._ending.set()
        if self._renewer is not None:
            await asyncio.shield(self._renewer)

    def given_back(self) -> None:
        """The turn's commit gave the lease back in its own write (`append(release=True)`): exit has nothing to do."""
        self._held = False

    async def _renew_until_ending(self) -> None:
        """Keep a long turn's lease alive; a failed renewal is logged and retried (the commit tells if it was lost)."""
        while not self._ending.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ending.wait(), self.lease.ttl_s / 3)
                return
            try:
                await loop_io.call(self.store, self.store.acquire_lease, self.session_id, *self.lease)
            except SessionError as error:
                log.warning("could not renew the turn lease of session %r: %s", self.session_id, error)

    async def _release(self) -> None:
        async def give_back() -> None:
            if self._renewer is not None:  # a renewal in flight lands first, or it could take the lease again
                with contextlib.suppress(Exception):
                    await self._renewer
            await loop_io.call(self.store, self.store.release_lease, self.session_id, self.holder)

        try:  # shielded: a cancelled turn still gives its lease back
            await asyncio.shield(give_back())
        except Exception as error:  # it lapses by itself after ttl_s
            log.warning("could not release the turn lease of session %r: %s", self.session_id, error)
