"""Session operations the ingress serves straight from a shared store, so they scale apart from the model.

Create, info, list, update, history, append, clear and destroy need the store (and the tokenizer, to count a
session's context tokens) but not the model. The store is one every process can reach (SQLite on one machine,
PostgreSQL or Redis on several; memory:// is refused in a Ray app), so the ingress answers them itself; only
turns, forks and freeing a session's KV go to a model replica. Turns stay ordered against these operations
through the store's turn lease (an edit during a turn is 409 `session_busy`), and `max_sessions` is counted in the
store, so it holds across every ingress.
"""

from __future__ import annotations

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from serving.bootstrap import open_sessions
from serving.config import Config
from serving.model_files import load_tokenizer
from serving.server.api import HistoryAPI
from serving.service import SessionCatalog
from sessions.prompt import PromptBuilder

log = logging.getLogger(__name__)

# The ingress renders a session's history without trimming when it counts its context tokens: it has no engine
# to say how long the context may be (a replica, which has one, reports the KV's size with every turn).
_NO_TRIM = 2**31 - 1


class ReplicaKV:
    """The ingress' EngineClient: it holds no KV, so freeing a session's KV is a call to the replica that does.

    Fire and forget: if the call is lost, the replica's orphan sweep frees the KV of sessions gone from the store.
    """

    def __init__(self, model: DeploymentHandle) -> None:
        self.model = model
        self.loop: asyncio.AbstractEventLoop | None = None  # the ingress' loop, set before any operation runs
        self._pending: set[asyncio.Task[None]] = set()

    def release(self, cache_key: str) -> None:
        """Called from the worker thread that ran the store operation."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._start, cache_key)

    def cache_keys(self) -> list[str]:
        return []

    def _start(self, cache_key: str) -> None:
        task = asyncio.get_running_loop().create_task(self._release(cache_key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release(self, cache_key: str) -> None:
        try:
            await self.model.options(session_id=cache_key).release_kv.remote(cache_key)
        except Exception:
            log.warning("could not free the KV of session %r on its replica; its orphan sweep will", cache_key)


def ingress_history(config: Config, model: DeploymentHandle) -> tuple[HistoryAPI, ReplicaKV]:
    """The ingress' own HistoryAPI over the configured (shared) store, and the KV releaser it tells."""
    kv = ReplicaKV(model)
    manager = open_sessions(config, kv, engine_is_local=False)
    prompts = PromptBuilder(load_tokenizer(config.model.name))
    return HistoryAPI(manager, SessionCatalog(manager, prompts, None, _NO_TRIM)), kv
