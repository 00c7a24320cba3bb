"""Render a session's history + the next user message into prompt token ids, the same way for every system.

sessionserve's own PromptBuilder (sessions/prompt.py) is used when it is importable and works, so the
benchmark sends the ids the server itself would build; otherwise the tokenizer's chat template. Either
way every system receives exactly the same ids for the same history.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from benchmarks.workload import Message

log = logging.getLogger(__name__)


class PromptRenderer:
    """`render(history, user)` -> token ids; `name` says which renderer is in use (recorded in the results)."""

    def __init__(self, tokenizer: Any, max_context_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self._builder: Any = None
        self._message_cls: Any = None
        self.name = "tokenizer.apply_chat_template"
        try:
            from sessions.messages import Message as SessionMessage
            from sessions.prompt import PromptBuilder

            self._builder, self._message_cls = PromptBuilder(tokenizer), SessionMessage
            self.render([{"role": "system", "content": "probe"}], "probe")
            self.name = "sessions.prompt.PromptBuilder"
        except Exception as error:  # not written yet, or a different signature: the template is as good here
            log.info("PromptBuilder unavailable (%s); using the tokenizer's chat template", error)
            self._builder = None

    def render(self, history: Sequence[Message], user: str, max_new_tokens: int = 0) -> list[int]:
        if self._builder is not None:
            system = history[0]["content"] if history and history[0]["role"] == "system" else None
            rest = history[1:] if system is not None else history
            built = self._builder.build(
                system,
                [self._message_cls(role=m["role"], content=m["content"]) for m in rest],
                [self._message_cls(role="user", content=user)],
                max_new_tokens=max_new_tokens,
                max_context_tokens=self.max_context_tokens,
            )
            return list(built.token_ids)
        messages = [*history, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
