"""LangChain chat history kept in a sessionserve session (`pip install 'sessionserve[langchain]'`).

    history = SessionChatMessageHistory(client, "my-session")
    chain = RunnableWithMessageHistory(prompt | llm, lambda sid: SessionChatMessageHistory(client, sid), ...)

The history lives on the server (the session's messages and system prompt), so any process with a client sees
the same conversation, and a turn run through our own API lands in the same history. A session that does not
exist yet reads as empty and is created by the first write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from serving.client import KEEP
from serving.server.protocol import APIError

if TYPE_CHECKING:
    from serving.client import LocalClient, SessionClient, _Keep

SUPPORTED = (
    "HumanMessage, AIMessage without tool calls, SystemMessage (it sets the session's system prompt) "
    "and ChatMessage with role user, assistant or system, all with text content"
)
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "ai": "assistant", "system": "system"}


class SessionChatMessageHistory(BaseChatMessageHistory):
    """`messages` / `add_messages` / `clear` over a session, through `SessionClient` (or `LocalClient`).

    `messages` starts with the session's system prompt as a SystemMessage when it has one; a SystemMessage
    added sets (replaces) that prompt wherever it appears in the batch. Messages that a session cannot hold
    (tool calls and results, images) are refused with ValueError before anything is written.
    """

    def __init__(self, client: SessionClient | LocalClient, session_id: str) -> None:
        super().__init__()
        self.client = client
        self.session_id = session_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]  # LangChain: "an attribute or a property"
        try:
            info = self.client.session_info(self.session_id)
            history = self.client.history(self.session_id)
        except APIError as error:
            if error.code == "session_not_found":
                return []
            raise
        system: list[BaseMessage] = [SystemMessage(info.system_prompt)] if info.system_prompt is not None else []
        return system + [HumanMessage(m.content) if m.role == "user" else AIMessage(m.content) for m in history]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        system, stored = _to_session(messages)
        try:
            self._write(system, stored)
        except APIError as error:
            if error.code != "session_not_found":
                raise
            try:  # first write: one create carries the system prompt and the messages
                prompt = None if system is KEEP else system
                self.client.create_session(self.session_id, system_prompt=prompt, messages=stored)
            except APIError as exists:
                if exists.code != "session_exists":  # created meanwhile by another writer: write into it
                    raise
                self._write(system, stored)

    def _write(self, system: str | _Keep, stored: list[dict[str, Any]]) -> None:
        if system is not KEEP:
            self.client.update_session(self.session_id, system_prompt=system)
        if stored:
            self.client.append(self.session_id, stored)

    def clear(self) -> None:
        """Forget the messages and the system prompt; the session itself (id, metadata) stays."""
        try:
            self.client.clear(self.session_id)
            self.client.update_session(self.session_id, system_prompt=None)
        except APIError as error:
            if error.code != "session_not_found":
                raise


def _to_session(messages: Sequence[BaseMessage]) -> tuple[str | _Keep, list[dict[str, Any]]]:
    """(the last SystemMessage's text, or KEEP without one; the others as wire dicts); refuses what cannot be kept."""
    system: str | _Keep = KEEP
    stored: list[dict[str, Any]] = []
    for message in messages:
        role = _role(message)
        text = _text(message)
        if role == "system":
            system = text
        else:
            stored.append({"role": role, "content": text})
    return system, stored


def _role(message: BaseMessage) -> str:
    if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
        raise ValueError(f"an AIMessage with tool calls cannot be stored in a session; supported: {SUPPORTED}")
    for cls, role in ((HumanMessage, "user"), (AIMessage, "assistant"), (SystemMessage, "system")):
        if isinstance(message, cls):  # chunks (AIMessageChunk, ...) included
            return role
    if isinstance(message, ChatMessage) and message.role in _ROLES:
        return _ROLES[message.role]
    kind = f"ChatMessage with role {message.role!r}" if isinstance(message, ChatMessage) else type(message).__name__
    raise ValueError(f"{kind} cannot be stored in a session; supported: {SUPPORTED}")


def _text(message: BaseMessage) -> str:
    """String content, or content blocks that are all text (joined as the server would)."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            raise ValueError(
                f"a {block.get('type')!r} content block of a {type(message).__name__} cannot be stored in a session"
                f" (text only); supported: {SUPPORTED}"
            )
    return "".join(parts)
