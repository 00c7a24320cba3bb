"""The composition root: config -> model, engine, store, SessionService. LocalClient and the Ray replica both
start here, so the in-process and the served paths are assembled by the same code."""

from __future__ import annotations

import logging
import os

from serving.config import Config
from serving.service import SessionService, TurnLimits
from sessions.manager import EngineClient, SessionManager
from sessions.prompt import PromptBuilder
from sessions.store import open_store

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a container or taskset really grants)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_torch_threads(cpus: int, replicas_on_node: int) -> int:
    """The node's CPUs shared among the model replicas on it, at least one each.

    Independent of Ray's `num_cpus` reservation, which stays fractional so several replicas can schedule:
    Ray sets OMP_NUM_THREADS from that reservation, and a minimal config would otherwise run torch on one thread.
    """
    return max(1, cpus // max(1, replicas_on_node))


def open_sessions(config: Config, engine: EngineClient | None, *, engine_is_local: bool = True) -> SessionManager:
    """The configured store behind a SessionManager; `engine` is told when a session's KV must go (a call to
    another process when not `engine_is_local`: then only for sessions whose record reports KV)."""
    sessions = config.sessions
    store = open_store(sessions.store_url(), idle_ttl_s=sessions.idle_ttl_s)
    return SessionManager(
        store,
        engine,
        max_sessions=sessions.max_sessions,
        idle_ttl_s=sessions.idle_ttl_s,
        release_unreported=engine_is_local,
        default_kv=sessions.default_kv,
    )


def build_service(config: Config, replicas_on_node: int = 1, replica: str = "") -> SessionService:
    """Load the model and open the store: the expensive part of a replica's (or LocalClient's) start."""
    from serving.engine.paged_engine import PagedEngine  # torch is imported only from here on
    from serving.models import load_model

    threads = config.model.torch_threads or default_torch_threads(usable_cpus(), replicas_on_node)
    log.info("torch uses %d CPU threads (model.torch_threads=%d)", threads, config.model.torch_threads)
    if config.engine.kind == "mii":
        from serving.engine.mii_engine import build_mii_engine

        engine, tokenizer = build_mii_engine(config.model, config.engine)
    else:
        loaded = load_model(config.model.model_copy(update={"torch_threads": threads}))
        engine, tokenizer = PagedEngine(loaded, config.engine, config.sessions.kv_path()), loaded.tokenizer
    manager = open_sessions(config, engine)
    limits = TurnLimits(config.serving.max_new_tokens, config.serving.max_prompt_tokens)
    prompts = PromptBuilder(tokenizer)
    return SessionService(manager, prompts, engine, limits, config.sessions.commit_timeout_s, replica)
