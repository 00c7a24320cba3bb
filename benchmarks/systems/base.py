"""What the driver needs from a system under test, and what every system is built from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # keep `--help` and the workload free of torch imports
    from serving.config import EngineConfig
    from serving.models import LoadedModel


@dataclass(slots=True)
class Turn:
    """One request. Engine-level systems run `prompt_ids`; full-path systems (which keep the session's history
    themselves, see `System.begin_session`) send only `user`, and their server builds the same prompt."""

    prompt_ids: list[int]  # the session's history plus `user`, rendered by the shared PromptRenderer
    user: str
    max_new_tokens: int


@dataclass(slots=True)
class StreamEvent:
    """Output new since the previous event: token ids, or text from systems that answer in text.

    `cached_tokens` when the system says how much prompt KV it reused; a full-path system's last event also says
    its own prompt / completion token counts and where the turn's time went (`phases_ms`, when it reports it).
    """

    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    phases_ms: dict[str, float] | None = None


@dataclass(slots=True)
class BenchContext:
    """Shared by every system of one run: one loaded model and one engine budget."""

    loaded: LoadedModel
    engine_config: EngineConfig  # kv_cache_memory is the device KV budget every pooled system gets
    max_new_tokens: int
    tokens_bound: int | None = None  # upper bound on the KV tokens the whole run can ever occupy at once
    ignore_eos: bool = False  # generate past EOS: every reply is exactly max_new_tokens long
    notes: dict[str, Any] = field(default_factory=dict)
    serve_port: int | None = None  # sessionserve-http: a Ray Serve proxy already started here (tests); None: its own
    # sessionserve-http on its own Ray: serving.ingress
    ingress: Literal["proxy", "direct", "replica", "haproxy"] = "proxy"


class System(Protocol):
    """A system under test. `stream` must not return before the request is done or has failed."""

    name: str

    async def start(self) -> None: ...

    async def begin_session(self, session_id: str, history: list[dict[str, str]]) -> None:
        """Before the session's first turn (not timed): full-path systems store the initial history here."""
        ...

    def stream(self, session_id: str, turn: Turn) -> AsyncIterator[StreamEvent]: ...

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
