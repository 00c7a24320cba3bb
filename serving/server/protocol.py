"""HTTP request/response shapes: the one place that defines the wire format.

Imported by the server and by `SessionClient`, so it must stay light: pydantic only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 1_000_000
MAX_NEW_TOKENS_CAP = 8192
KVPolicyName = Literal["pinned", "evictable", "none"]  # a session's KV policy (serving.engine.types.KVPolicy)


class _Strict(BaseModel):
    """Our own routes refuse unknown fields, so a typo ('max_tokens') is a 422, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="'text'; other part types are refused for text-only models")
    text: str | None = None
    value: str | None = Field(None, description="MLServer spelling of text")


class MessageIn(_Strict):
    role: str = Field(description="system, user or assistant")
    content: str | list[TextPart]


class MessageOut(BaseModel):
    role: str
    content: str


class CreateSessionRequest(_Strict):
    session_id: str | None = Field(None, description="1-128 chars of A-Z a-z 0-9 . _ : -; a UUID4 if omitted")
    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[MessageIn] = Field(default_factory=list, description="initial history (user/assistant)")
    metadata: dict[str, Any] = Field(default_factory=dict)
    kv: KVPolicyName | None = Field(
        None,
        description="what the session's KV is worth keeping: pinned (kept between turns), evictable (kept while "
        "nothing else needs the room) or none (history only, prefilled every turn); omitted: the server's default",
    )


class ForkSessionRequest(_Strict):
    session_id: str | None = Field(None, description="id of the new session; a UUID4 if omitted")


class KVState(BaseModel):
    tier: Literal["device", "host", "disk", "none"]
    tokens: int
    policy: KVPolicyName = "pinned"


class TokenUsage(BaseModel):
    """Cumulative over the session's committed turns since its history began (creation, clear, new system prompt)."""

    prompt_tokens: int = 0
    cached_tokens: int = Field(0, description="prompt tokens whose KV was reused")
    recomputed_tokens: int = Field(
        0, description="prompt tokens computed again although an earlier turn had computed them (all of a first turn's)"
    )
    completion_tokens: int = 0


class SessionSummary(BaseModel):
    """A session in a listing: its record and where its KV lives as last reported (no history read)."""

    session_id: str
    system_prompt: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    last_active_at: float
    kv: KVState
    usage: TokenUsage = Field(default_factory=TokenUsage)


class SessionInfo(SessionSummary):
    """One session in full: the summary plus what reading its history tells."""

    turns: int
    messages: int
    context_tokens: int


class SessionList(BaseModel):
    sessions: list[SessionSummary]
    next_offset: int | None = Field(None, description="offset of the next page; null on the last page")


class UpdateSessionRequest(_Strict):
    """PATCH: a field left out stays as it is; `system_prompt: null` clears it; `metadata` replaces the whole object."""

    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    metadata: dict[str, Any] | None = None


class QueryRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user's message")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_CAP)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16, description="stop strings")
    ignore_eos: bool = Field(False, description="generate past EOS up to max_new_tokens (benchmarks, as in vLLM)")
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class Timing(BaseModel):
    ttft_ms: float
    total_ms: float
    phases_ms: dict[str, float] = Field(
        default_factory=dict,
        description="the whole turn by phase: store_read, prompt, queue, schedule, prepare, forward, sample, detok,"
        " commit, other (hand-offs between threads and processes), total",
    )


class QueryResponse(BaseModel):
    session_id: str
    response: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timing: Timing


class WarmResponse(BaseModel):
    """POST /v1/sessions/{sid}/warm: the session's KV is on the device of the replica that serves its turns."""

    session_id: str
    source: Literal["device", "host", "disk", "recomputed"] = Field(
        description="where the KV came from: already on the device, the host tier, the disk tier, or recomputed"
    )
    tokens: int = Field(description="tokens of the history whose KV is on the device now")
    cached_tokens: int = Field(description="of those, tokens reused rather than recomputed")
    ms: float = Field(description="how long warming took on the replica")


class AppendRequest(_Strict):
    messages: list[MessageIn] = Field(min_length=1)


class MessagesResponse(BaseModel):
    session_id: str
    messages: list[MessageOut]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """What both clients raise for a refused request: the HTTP status, a stable code and what to fix."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple:  # crosses process boundaries (Ray) intact
        return (APIError, (self.status, self.code, self.message))
