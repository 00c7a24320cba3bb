"""Build the configured engine. Each kind is one entry in `_BUILDERS`."""

from __future__ import annotations

from collections.abc import Callable

from serving.config import EngineConfig
from serving.engine.types import Engine
from serving.models import LoadedModel


def _simple(loaded: LoadedModel, engine_config: EngineConfig) -> Engine:
    from serving.engine.simple_engine import SimpleEngine

    return SimpleEngine(loaded, max_model_len=engine_config.max_model_len)


def _paged(loaded: LoadedModel, engine_config: EngineConfig) -> Engine:
    from serving.engine.async_engine import PagedEngine

    return PagedEngine(loaded, engine_config)


_BUILDERS: dict[str, Callable[[LoadedModel, EngineConfig], Engine]] = {
    "simple": _simple,
    "paged": _paged,
}


def engine_kinds() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def build_engine(loaded: LoadedModel, engine_config: EngineConfig, kind: str | None = None) -> Engine:
    """`kind` overrides engine_config.kind (benchmarks compare kinds on one config)."""
    kind = kind or engine_config.kind
    try:
        builder = _BUILDERS[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(_BUILDERS)}") from None
    return builder(loaded, engine_config)
