"""SessionAPI: protocol models in, protocol models out, errors as APIError.

The one adapter between the wire format and SessionService. The Ray model deployment and the in-process
LocalClient both call it, so the two clients see exactly the same behaviour. Store-bound calls go through
`manager.store_call`, so the event loop that streams tokens never waits on the store.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from serving.engine.types import SamplingParams
from serving.server import protocol
from serving.server.errors import to_api_error
from serving.server.openai_api import OpenAIChat
from serving.server.openai_protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from serving.service import SessionCatalog, SessionDetails, SessionService, TextDelta, TurnResult
from sessions.errors import InvalidRequest
from sessions.manager import SessionManager
from sessions.messages import Message, parse_messages
from sessions.store.base import SessionRecord

P = ParamSpec("P")
R = TypeVar("R")


def _as_api_errors(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Any exception leaving a public method becomes an APIError with an HTTP status."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except Exception as error:
            raise to_api_error(error) from error

    return wrapper


def sampling_params(request: protocol.QueryRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
    )


def user_turn(prompt: str) -> list[Message]:
    if not prompt.strip():
        raise InvalidRequest("prompt is empty: send the user's message as a non-empty string")
    return [Message(role="user", content=prompt)]


def _public(record: SessionRecord, tier: str, tokens: int) -> dict[str, Any]:
    """The record's fields a client sees (not its owner or lease), with the KV's `tier` and `tokens` as known."""
    usage = record.kv.usage
    return {
        "session_id": record.session_id,
        "system_prompt": record.system_prompt,
        "metadata": record.metadata,
        "created_at": record.created_at,
        "last_active_at": record.last_active_at,
        "kv": protocol.KVState(tier=tier, tokens=tokens, policy=record.kv_policy),
        "usage": protocol.TokenUsage(
            prompt_tokens=usage.prompt,
            cached_tokens=usage.cached,
            recomputed_tokens=usage.recomputed,
            completion_tokens=usage.completion,
        ),
    }


def _messages_response(session_id: str, history: list[Message]) -> protocol.MessagesResponse:
    return protocol.MessagesResponse(
        session_id=session_id, messages=[protocol.MessageOut(role=m.role, content=m.content) for m in history]
    )


def query_response(result: TurnResult) -> protocol.QueryResponse:
    return protocol.QueryResponse(
        session_id=result.session_id,
        response=result.response,
        finish_reason=result.finish_reason,
        usage=protocol.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
        ),
        timing=protocol.Timing(
            ttft_ms=round(result.ttft_ms, 3), total_ms=round(result.total_ms, 3), phases_ms=result.timing.phases_ms()
        ),
    )


class HistoryAPI:
    """Session operations that need the store (and the tokenizer, for context tokens) but not the model.

    The ingress serves these straight from the shared store, so they scale apart from the model replicas;
    LocalClient gets them as part of SessionAPI.
    """

    def __init__(self, manager: SessionManager, catalog: SessionCatalog) -> None:
        self.manager = manager
        self.catalog = catalog

    @_as_api_errors
    async def create_session(
        self, request: protocol.CreateSessionRequest, owner: str | None = None
    ) -> protocol.SessionInfo:
        messages = parse_messages([m.model_dump(exclude_none=True) for m in request.messages])

        def create() -> protocol.SessionInfo:  # one store call for the whole operation
            record = self.manager.create(
                request.session_id,
                system_prompt=request.system_prompt,
                messages=messages,
                metadata=request.metadata,
                owner=owner,
                kv_policy=request.kv,
            )
            return self._session_info(self.catalog.describe(record, messages))

        return await self.manager.store_call(create)

    @_as_api_errors
    async def get_session(self, session_id: str, owner: str | None = None) -> protocol.SessionInfo:
        return await self.manager.store_call(self._info, session_id, owner)

    @_as_api_errors
    async def list_sessions(self, limit: int = 50, offset: int = 0, owner: str | None = None) -> protocol.SessionList:
        records = await self.manager.store_call(self.manager.list_sessions, owner, limit, offset)
        page = [protocol.SessionSummary(**_public(record, record.kv.tier, record.kv.tokens)) for record in records]
        next_offset = offset + len(page) if len(page) == limit else None
        return protocol.SessionList(sessions=page, next_offset=next_offset)

    @_as_api_errors
    async def update_session(
        self, session_id: str, request: protocol.UpdateSessionRequest, owner: str | None = None
    ) -> protocol.SessionInfo:
        changes: dict[str, Any] = {}
        if "system_prompt" in request.model_fields_set:  # absent: unchanged; null: cleared
            changes["system_prompt"] = request.system_prompt
        if request.metadata is not None:
            changes["metadata"] = request.metadata

        def update() -> protocol.SessionInfo:
            self.manager.update(session_id, owner, **changes)
            return self._info(session_id, owner)

        return await self.manager.store_call(update)

    @_as_api_errors
    async def destroy_session(self, session_id: str, owner: str | None = None) -> None:
        await self.manager.store_call(self.manager.destroy, session_id, owner)

    @_as_api_errors
    async def messages(
        self, session_id: str, window: int | None = None, owner: str | None = None
    ) -> protocol.MessagesResponse:
        return await self.manager.store_call(self._messages, session_id, window, owner)

    @_as_api_errors
    async def append(
        self, session_id: str, request: protocol.AppendRequest, owner: str | None = None
    ) -> protocol.MessagesResponse:
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        stored = await self.manager.store_call(self.manager.append, session_id, messages, owner)
        return _messages_response(session_id, stored)

    @_as_api_errors
    async def clear(self, session_id: str, owner: str | None = None) -> None:
        await self.manager.store_call(self.manager.clear, session_id, owner)

    async def store_problem(self) -> str | None:
        """Why the history store cannot be used right now, or None."""
        try:
            await self.manager.store_call(self.manager.store.ping)
        except Exception as error:
            return f"the history store does not answer: {to_api_error(error).message}"
        return None

    def _messages(self, session_id: str, window: int | None, owner: str | None) -> protocol.MessagesResponse:
        return _messages_response(session_id, self.manager.history(session_id, window, owner))

    def _info(self, session_id: str, owner: str | None) -> protocol.SessionInfo:
        return self._session_info(self.catalog.details(session_id, owner))

    @staticmethod
    def _session_info(details: SessionDetails) -> protocol.SessionInfo:
        return protocol.SessionInfo(
            **_public(details.record, details.kv.tier, details.kv.tokens),
            turns=details.turns,
            messages=details.messages,
            context_tokens=details.context_tokens,
        )


class SessionAPI(HistoryAPI):
    """Every public operation, for a model replica and LocalClient; raises APIError for anything refused."""

    def __init__(self, service: SessionService, model_name: str = "sessionserve") -> None:
        super().__init__(service.manager, service.catalog)
        self.service = service
        self.openai = OpenAIChat(service, model_name)

    @_as_api_errors
    async def fork_session(
        self, session_id: str, request: protocol.ForkSessionRequest, owner: str | None = None
    ) -> protocol.SessionInfo:

        def fork() -> protocol.SessionInfo:
            return self._info(self.service.fork(session_id, request.session_id, owner).session_id, owner)

        return await self.manager.store_call(fork)

    @_as_api_errors
    async def query(
        self, session_id: str, request: protocol.QueryRequest, owner: str | None = None
    ) -> protocol.QueryResponse:
        turn = self.service.turn(session_id, user_turn(request.prompt), sampling_params(request), owner)
        *_, result = [event async for event in turn]  # a turn's events end with its TurnResult
        assert isinstance(result, TurnResult)
        return query_response(result)

    async def query_stream(
        self, session_id: str, request: protocol.QueryRequest, owner: str | None = None
    ) -> AsyncIterator[str | protocol.QueryResponse]:
        """Text deltas (str), then the final QueryResponse. Errors raise APIError."""
        try:
            events = self.service.turn(session_id, user_turn(request.prompt), sampling_params(request), owner)
            async for event in events:
                yield event.text if isinstance(event, TextDelta) else query_response(event)
        except Exception as error:
            raise to_api_error(error) from error

    @_as_api_errors
    async def chat_completion(
        self, request: ChatCompletionRequest, session_id: str | None = None, owner: str | None = None
    ) -> ChatCompletionResponse:
        return await self.openai.complete(request, session_id, owner)

    async def chat_completion_stream(
        self, request: ChatCompletionRequest, session_id: str | None = None, owner: str | None = None
    ) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for chunk in self.openai.stream(request, session_id, owner):
                yield chunk
        except Exception as error:
            raise to_api_error(error) from error

    @_as_api_errors
    async def warm(self, session_id: str, owner: str | None = None) -> protocol.WarmResponse:
        result = await self.service.warm(session_id, owner)
        return protocol.WarmResponse(
            session_id=result.session_id,
            source=result.source,
            tokens=result.tokens,
            cached_tokens=result.cached_tokens,
            ms=result.ms,
        )

    async def release_kv(self, session_id: str) -> None:
        """Free a session's KV here (the ingress destroyed or cleared it in the store)."""
        self.service.engine.release(session_id)

    async def not_ready(self) -> str | None:
        """Why this replica cannot serve (engine failed, store unreachable), or None."""
        return self.service.engine.health() or await self.store_problem()
