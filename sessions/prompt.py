"""PromptBuilder: system prompt + history + new messages -> token ids that fit the context, safe from injection.

Pieces are tokenized separately and concatenated: markup with special tokens recognised, message text with special
tokens split. Because a piece's ids never depend on its neighbours, a conversation's prompt is a prefix of the next
turn's prompt (when nothing was trimmed), so the engine can reuse the session's KV by longest common prefix.

BOS: a chat template renders whatever the model expects at the start (many emit the BOS token themselves), and
its output is used as is, so BOS never appears twice. A model without a chat template (a base model) gets the
tokenizer's BOS first whenever the tokenizer's own `encode` would add one: it was trained on such sequences.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sessions.errors import ContextTooLong, InvalidRequest
from sessions.messages import Message, parse_messages
from sessions.template import ChatTemplate


@dataclass(frozen=True, slots=True)
class Prompt:
    """The ids to generate from, plus how much history had to be trimmed to fit (worth reporting to the user)."""

    token_ids: list[int]
    dropped_messages: int  # oldest history messages left out so that prompt + max_new_tokens fits the context
    kept_messages: int  # history messages in the prompt (system prompt and new messages not counted)


def turn_starts(history: Sequence[Message]) -> list[int]:
    """Index where each turn begins: at every user message (and at 0), so trimming drops whole turns."""
    return [i for i, message in enumerate(history) if i == 0 or message.role == "user"]


class PromptBuilder:
    """Renders conversations with one tokenizer; reusable and thread-safe, called once per turn."""

    def __init__(self, tokenizer: Any, *, default_system_prompt: str | None = None, cache_size: int = 8192) -> None:
        # A private copy: HF fast tokenizers implement split_special_tokens by flipping a flag on the shared backend
        # before encoding, so another thread encoding with the same object could make user text parse as markup.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._template = ChatTemplate(self._tokenizer)
        # a base model's prompt starts like its tokenizer's own encode() output; a chat template decides for itself
        self._bos: tuple[int, ...] = () if self._template.has_chat_template else added_bos(self._tokenizer)
        self.default_system_prompt = default_system_prompt
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[bool, str], tuple[int, ...]] = OrderedDict()  # history repeats every turn
        self._cache_size = cache_size

    def build(
        self,
        system_prompt: str | None,
        history: Sequence[Message],
        new_messages: Sequence[Message],
        *,
        max_new_tokens: int,
        max_context_tokens: int,
    ) -> Prompt:
        """Render the conversation, dropping the oldest whole turns of history until prompt + max_new_tokens fits."""
        if max_new_tokens < 0 or max_context_tokens < 1:
            raise InvalidRequest(
                f"need max_new_tokens >= 0 and max_context_tokens >= 1, got {max_new_tokens} and {max_context_tokens}"
            )
        history, new_messages = parse_messages(history), parse_messages(new_messages)
        system = system_prompt if system_prompt is not None else self.default_system_prompt
        head = [] if system is None else [Message("system", system)]
        if not head and not history and not new_messages:
            return Prompt(token_ids=[], dropped_messages=0, kept_messages=0)  # nothing to render, nothing to cache
        budget = max_context_tokens - max_new_tokens
        starts = [*turn_starts(history), len(history)]  # starts[k]: first kept message when k turns are dropped

        def pieces_for(dropped_turns: int) -> list[tuple[int, ...]]:
            return self._encode_pieces([*head, *history[starts[dropped_turns] :], *new_messages])

        chosen, last = 0, len(starts) - 1
        encoded = pieces_for(0)
        if _length(encoded) > budget:
            if last:
                encoded = pieces_for(last)
            if _length(encoded) > budget:
                needed = _length(encoded)
                raise ContextTooLong(
                    f"this turn needs {needed} prompt tokens even with all earlier history dropped; {needed} + "
                    f"max_new_tokens {max_new_tokens} = {needed + max_new_tokens} exceeds the model context of "
                    f"{max_context_tokens} tokens: shorten the message or the system prompt, or lower max_new_tokens"
                )
            chosen = last
            low, high = 0, last  # invariant: dropping `low` turns does not fit, dropping `high` turns does
            while high - low > 1:
                middle = (low + high) // 2
                candidate = pieces_for(middle)
                if _length(candidate) <= budget:
                    high, chosen, encoded = middle, middle, candidate
                else:
                    low = middle
        token_ids = [token for piece in encoded for token in piece]
        dropped = starts[chosen]
        return Prompt(token_ids=token_ids, dropped_messages=dropped, kept_messages=len(history) - dropped)

    def _encode_pieces(self, messages: list[Message]) -> list[tuple[int, ...]]:
        pieces = self._template.pieces(messages)
        with self._lock:
            encoded = [self._encode(text, plain=plain) for text, plain in pieces]
        return [self._bos, *encoded] if self._bos else encoded

    def _encode(self, text: str, *, plain: bool) -> tuple[int, ...]:
        """Token ids of one piece; plain text gets special tokens split so "<|im_start|>" stays characters."""
        key = (plain, text)
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            return ids
        ids = tuple(self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=plain))
        self._cache[key] = ids
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids


def added_bos(tokenizer: Any) -> tuple[int, ...]:
    """(bos_token_id,) when the tokenizer's encode() puts BOS before the text it is given, else ()."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    with_special = list(tokenizer.encode("Hello", add_special_tokens=True))
    plain = list(tokenizer.encode("Hello", add_special_tokens=False))
    return (int(bos),) if with_special[:1] == [bos] and plain[:1] != [bos] else ()


def _length(pieces: list[tuple[int, ...]]) -> int:
    return sum(len(piece) for piece in pieces)
