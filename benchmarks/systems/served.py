"""What the full-path systems (sessionserve-local, sessionserve-http) share: one server config, one store kind.

Both get the benchmark's model, device, dtype, engine budget and torch threads, and a fresh SQLite store in a
temporary directory, so the only difference between them is the transport (in-process vs HTTP + Ray Serve).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.systems.base import BenchContext, StreamEvent

if TYPE_CHECKING:
    from serving.config import Config


def served_config(context: BenchContext, store_dir: Path) -> Config:
    import torch

    from serving.config import load_config

    loaded = context.loaded
    return load_config(
        None,
        {
            "model": {
                "name": loaded.name,
                "device": str(loaded.device),
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(),  # the same threads as the in-process systems
            },
            "engine": context.engine_config.model_dump(),
            "sessions": {"store": f"sqlite:///{store_dir / 'sessions.db'}"},
            # half a Ray CPU: scheduling only (torch_threads sets the threads), and room for a test cluster's apps
            "serving": {
                "max_new_tokens": max(4096, context.max_new_tokens),
                "cpus_per_replica": 0.5,
                "ingress": context.ingress,
            },
        },
    )


def store_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def split_history(history: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """The workload's history as a session: (system prompt, the other messages)."""
    if history and history[0]["role"] == "system":
        return history[0]["content"], history[1:]
    return None, history


def final_event(prompt: int, completion: int, cached: int, phases_ms: dict[str, float] | None) -> StreamEvent:
    return StreamEvent(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, phases_ms=phases_ms)
