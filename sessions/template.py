"""Render a conversation to *pieces*: (text, is_message_text) in prompt order.

The template is rendered once with every content replaced by a sentinel, then split at the sentinels. This keeps
the template's markup (trusted: may contain special tokens) apart from message text (untrusted: must be tokenized as
plain text), which is what makes prompts injection-safe without re-implementing any model's template.

Because the template never sees a message's text, what it renders depends only on the roles in order: the split
rendering is cached by them, so a conversation shape is rendered once however many sessions and turns share it
(jinja was most of what a session's info or a turn's prompt cost). A template that reads the clock (`strftime_now`,
e.g. Llama 3's "Today Date") is rendered every time.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from sessions.errors import InvalidRequest
from sessions.messages import Message

Piece = tuple[str, bool]  # (text, True if it is message text to be tokenized as plain text)
RENDER_CACHE_MESSAGES = 1 << 16  # the cache holds renderings of at most this many messages in all
_FALLBACK_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def fallback_render(messages: Sequence[dict[str, str]]) -> str:
    """For tokenizers without a chat template: "Role: content" lines, ending with the assistant's cue."""
    return "".join(f"{_FALLBACK_LABELS[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"


def _is_template_error(error: Exception) -> bool:
    # jinja2.TemplateError (e.g. a template's raise_exception("roles must alternate")), matched by name so this
    # package need not import jinja2.
    return any(cls.__name__ == "TemplateError" for cls in type(error).__mro__)


class ChatTemplate:
    """The tokenizer's chat template (or the fallback) as a function from messages to pieces."""

    def __init__(self, tokenizer: Any, *, cache_messages: int = RENDER_CACHE_MESSAGES) -> None:
        self._tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat_template = template is not None
        self._nonce = secrets.token_hex(8)
        self._cacheable = "strftime_now" not in str(template)
        self._lock = threading.Lock()
        self._splits: OrderedDict[tuple[str, ...], list[str]] = OrderedDict()  # roles -> _split's answer
        self._cached_messages = 0
        self._cache_messages = cache_messages

    def _render(self, conversation: list[dict[str, str]]) -> str:
        if not self.has_chat_template:
            return fallback_render(conversation)
        try:
            return str(self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        except Exception as error:
            if _is_template_error(error):
                raise InvalidRequest(f"the model's chat template refused this conversation: {error}") from None
            raise

    def pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """Markup and message text in prompt order; a message the template omits simply contributes nothing."""
        nonce = self._nonce
        while any(nonce in message.content for message in messages):  # a guessed nonce cannot smuggle a slot in
            nonce = secrets.token_hex(8)
        parts = self._split(nonce, tuple(m.role for m in messages))
        # re.split with one group alternates: markup, index, markup, index, ..., markup
        pieces: list[Piece] = []
        for position, part in enumerate(parts):
            if position % 2 == 0:
                if part:
                    pieces.append((part, False))
                continue
            text = messages[int(part)].content
            if pieces and not pieces[-1][1] and pieces[-1][0].endswith(" "):
                # "User: " + "Hi" -> "User:" + " Hi": byte-level BPE attaches a word's leading space to the word
                markup = pieces.pop()[0]
                kept = markup.rstrip(" ")
                if kept:
                    pieces.append((kept, False))
                text = markup[len(kept) :] + text
            pieces.append((text, True))
        return pieces

    def _split(self, nonce: str, roles: tuple[str, ...]) -> list[str]:
        """The template rendered for these roles with sentinel contents, split at the sentinels. Cached for the
        usual nonce (least recently used out first); a one-off nonce is rendered every time."""
        cacheable = self._cacheable and nonce == self._nonce and len(roles) <= self._cache_messages
        if cacheable:
            with self._lock:
                parts = self._splits.get(roles)
                if parts is not None:
                    self._splits.move_to_end(roles)
                    return parts
        sentinel = re.compile(re.escape(f"[[{nonce}:") + r"(\d+)\]\]")
        conversation = [{"role": role, "content": f"[[{nonce}:{i}]]"} for i, role in enumerate(roles)]
        parts = sentinel.split(self._render(conversation))
        if cacheable:
            with self._lock:
                if roles not in self._splits:
                    self._splits[roles] = parts
                    self._cached_messages += len(roles)
                while self._cached_messages > self._cache_messages:
                    evicted, _ = self._splits.popitem(last=False)
                    self._cached_messages -= len(evicted)
        return parts
