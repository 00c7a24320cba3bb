"""OpenAI chat completions on top of SessionService.

Without a session id the request is stateless: the messages are the whole conversation. With `x-session-id`
they are the new turn(s) of that session (created on first use), and the reply is committed to it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Sequence

from serving.engine.types import SamplingParams
from serving.server.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceMessage,
    ChunkChoice,
    CompletionUsage,
    Delta,
    PromptTokensDetails,
    completion_id,
)
from serving.service import SessionService, TextDelta, TurnResult
from sessions.errors import InvalidRequest, SessionExists, SessionNotFound
from sessions.messages import Message, parse_messages


def _params(request: ChatCompletionRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=request.new_tokens(),
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=request.stop_list(),
        ignore_eos=request.ignore_eos,
    )


def _usage(result: TurnResult) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
    )


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """OpenAI puts the system prompt among the messages; we keep it apart (it is never trimmed)."""
    system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    return ("\n\n".join(system) if system else None), rest


class OpenAIChat:
    def __init__(self, service: SessionService, model_name: str) -> None:
        self.service = service
        self.model_name = model_name

    async def complete(
        self, request: ChatCompletionRequest, session_id: str | None, owner: str | None
    ) -> ChatCompletionResponse:
        *_, result = [event async for event in await self._events(request, session_id, owner)]
        assert isinstance(result, TurnResult)  # a turn's events end with its TurnResult
        return ChatCompletionResponse(
            model=self.model_name,
            choices=[Choice(message=ChoiceMessage(content=result.response), finish_reason=_finish(result))],
            usage=_usage(result),
        )

    async def stream(
        self, request: ChatCompletionRequest, session_id: str | None, owner: str | None
    ) -> AsyncIterator[ChatCompletionChunk]:
        ident, created = completion_id(), int(time.time())

        def chunk(delta: Delta, finish: str | None = None, usage: CompletionUsage | None = None) -> ChatCompletionChunk:
            choice = ChunkChoice(delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=ident, created=created, model=self.model_name, choices=[choice], usage=usage)

        first = True
        async for event in await self._events(request, session_id, owner):
            if isinstance(event, TextDelta):
                yield chunk(Delta(role="assistant" if first else None, content=event.text))
                first = False
            else:
                yield chunk(Delta(), _finish(event), _usage(event))

    async def _events(
        self, request: ChatCompletionRequest, session_id: str | None, owner: str | None
    ) -> AsyncIterator[TextDelta | TurnResult]:
        messages = parse_messages([m.model_dump(exclude_none=True) for m in request.messages])
        system_prompt, turn = _split_system(messages)
        if session_id is None:
            return self.service.stateless(system_prompt, turn, _params(request))
        ensure = functools.partial(self._ensure_session, session_id, system_prompt, request.kv, owner)
        return self.service.turn(session_id, turn, _params(request), owner, check=ensure)

    def _ensure_session(self, session_id: str, system_prompt: str | None, kv: str | None, owner: str | None) -> None:
        """Create on first use (with `kv` as its KV policy); afterwards a system message and `kv` must match the
        session's (or be left out)."""
        try:
            record = self.service.manager.get(session_id, owner)
        except SessionNotFound:
            with contextlib.suppress(SessionExists):  # a concurrent first request created it
                self.service.manager.create(session_id, system_prompt=system_prompt, owner=owner, kv_policy=kv)
            return
        if system_prompt is not None and system_prompt != record.system_prompt:
            raise InvalidRequest(
                f"session {session_id!r} already has a different system prompt; send only the new turn's messages"
            )
        if kv is not None and kv != record.kv_policy:
            raise InvalidRequest(
                f"session {session_id!r} has KV policy {record.kv_policy!r}, chosen when it was created; leave kv out"
            )


def _finish(result: TurnResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"
