"""Chat messages: one validated shape for every way a client may spell one (OpenAI parts, MLServer parts, strings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sessions.errors import InvalidRequest

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = get_args(Role)
_ROLE_LIST = ", ".join(repr(role) for role in ROLES)
# Part types that carry media: refused with a clear message instead of silently dropping them.
_MEDIA_PARTS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file"})


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. Validated on construction so a Message in hand is always storable and renderable."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequest(f"role {self.role!r} is not allowed: use one of {_ROLE_LIST}")
        if not isinstance(self.content, str):
            raise InvalidRequest(f"content must be a string or a list of text parts, got {type(self.content).__name__}")
        if not self.content.isascii():
            try:
                self.content.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (valid JSON escapes, invalid text) would fail in storage
                raise InvalidRequest("content is not valid Unicode text (it contains a lone surrogate)") from None

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _part_text(part: Any) -> str:
    if not isinstance(part, Mapping):
        raise InvalidRequest(f"a content part must be an object like {{'type': 'text', 'text': ...}}, got {part!r}")
    kind = part.get("type")
    if kind in _MEDIA_PARTS:
        raise InvalidRequest(f"content part of type {kind!r} refused: this model is text-only, send text parts")
    if kind != "text":
        raise InvalidRequest(f"content part type {kind!r} is not supported: use {{'type': 'text', 'text': ...}}")
    text = part.get("text", part.get("value"))  # OpenAI spells it "text", MLServer "value"
    if not isinstance(text, str):
        raise InvalidRequest("a text part needs a string under 'text' (OpenAI) or 'value' (MLServer)")
    return text


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return "".join(_part_text(part) for part in content)
    raise InvalidRequest(f"content must be a string or a list of text parts, got {type(content).__name__}")


def parse_message(obj: Message | Mapping[str, Any]) -> Message:
    """Accept a Message or a dict {role, content}; content may be a string or a list of text parts, joined in order."""
    if isinstance(obj, Message):
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidRequest(f"a message must be an object with 'role' and 'content', got {type(obj).__name__}")
    if "role" not in obj or "content" not in obj:
        raise InvalidRequest("a message needs both 'role' and 'content'")
    role = obj["role"]
    if role not in ROLES:
        raise InvalidRequest(f"role {role!r} is not allowed: use one of {_ROLE_LIST}")
    return Message(role=role, content=_content_text(obj["content"]))


def parse_messages(items: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    """Parse every message or none: the error names the index of the first bad one."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse_message(item))
        except InvalidRequest as error:
            raise InvalidRequest(f"messages[{index}]: {error}") from None
    return parsed
