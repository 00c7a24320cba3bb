"""Render a session's history + the next user message into prompt token ids, the same way for every system.

sessionserve's own PromptBuilder (sessions/prompt.py) builds them, so the benchmark sends exactly the ids the
server itself would build, and every system receives the same ids for the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.workload import Message
from sessions.messages import Message as SessionMessage
from sessions.prompt import PromptBuilder


class PromptRenderer:
    """`render(history, user)` -> token ids; `name` says which renderer is in use (recorded in the results)."""

    name = "sessions.prompt.PromptBuilder"

    def __init__(self, tokenizer: Any, max_context_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self._builder = PromptBuilder(tokenizer)

    def render(self, history: Sequence[Message], user: str, max_new_tokens: int = 0) -> list[int]:
        system = history[0]["content"] if history and history[0]["role"] == "system" else None
        rest = history[1:] if system is not None else history
        built = self._builder.build(
            system,
            [SessionMessage(role=m["role"], content=m["content"]) for m in rest],
            [SessionMessage(role="user", content=user)],
            max_new_tokens=max_new_tokens,
            max_context_tokens=self.max_context_tokens,
        )
        return list(built.token_ids)
