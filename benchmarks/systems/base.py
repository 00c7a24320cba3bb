"""What the driver needs from a system under test, and what every system is built from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # keep `--help` and the workload free of torch imports
    from serving.config import EngineConfig
    from serving.models import LoadedModel


@dataclass(slots=True)
class StreamEvent:
    """Tokens new since the previous event; `cached_tokens` when the system says how much prompt KV it reused."""

    token_ids: list[int]
    cached_tokens: int | None = None


@dataclass(slots=True)
class BenchContext:
    """Shared by every system of one run: one loaded model and one engine budget."""

    loaded: LoadedModel
    engine_config: EngineConfig  # kv_cache_memory is the device KV budget every pooled system gets
    max_new_tokens: int
    tokens_bound: int | None = None  # upper bound on the KV tokens the whole run can ever occupy at once
    ignore_eos: bool = False  # generate past EOS: every reply is exactly max_new_tokens long
    notes: dict[str, Any] = field(default_factory=dict)


class System(Protocol):
    """A system under test. `stream` must not return before the request is done or has failed."""

    name: str

    async def start(self) -> None: ...

    def stream(self, session_id: str, prompt_ids: list[int], max_new_tokens: int) -> AsyncIterator[StreamEvent]: ...

    async def end_session(self, session_id: str) -> None:
        """The session's conversation is over: free what it holds (what a client's destroy would do)."""
        ...

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """JSON-ready facts about how the system was configured and what it did (recorded in the results)."""
        ...


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Device bytes of K and V for one token over all layers."""
    config = loaded.model.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * loaded.dtype.itemsize
