"""End to end in-process: exact KV reuse against plain transformers, and history that survives a restart."""

from __future__ import annotations

import pytest
import torch

from serving.client import LocalClient
from sessions.messages import Message
from sessions.prompt import PromptBuilder
from tests.support import smollm2_config

pytestmark = pytest.mark.model


def reference_reply(smollm2, system_prompt: str | None, history: list[Message], prompt: str, n: int) -> str:
    """Plain transformers greedy `generate` on the full rendered prompt: the definition of correct."""
    ids = PromptBuilder(smollm2.tokenizer).build(
        system_prompt, history, [Message("user", prompt)], max_new_tokens=n, max_context_tokens=1024
    )
    with torch.inference_mode():
        out = smollm2.model.generate(torch.tensor([ids.token_ids]), max_new_tokens=n, do_sample=False)
    return smollm2.tokenizer.decode(out[0, len(ids.token_ids) :], skip_special_tokens=True)


def test_turns_with_reused_kv_equal_plain_generate(local_client, smollm2):
    sid = local_client.create_session("exact-1", system_prompt="You are a helpful geography tutor.")
    prompts = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?"]
    previous_prompt_tokens = 0
    for turn, prompt in enumerate(prompts):
        history = [Message(m.role, m.content) for m in local_client.history(sid)]
        expected = reference_reply(smollm2, "You are a helpful geography tutor.", history, prompt, 20)
        reply = local_client.query(prompt, session_id=sid, max_new_tokens=20)
        assert reply.response == expected.strip() or reply.response == expected
        if turn:
            assert reply.usage.cached_tokens >= previous_prompt_tokens
        previous_prompt_tokens = reply.usage.prompt_tokens
    local_client.destroy_session(sid)


def test_history_and_kv_survive_a_process_restart(smollm2_dir, tmp_path):
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    with LocalClient(smollm2_config(store)) as first:
        sid = first.create_session("durable", system_prompt="Be brief.")
        before = first.query("What is the capital of France?", session_id=sid, max_new_tokens=16)
    with LocalClient(smollm2_config(store)) as second:  # a new process' worth of state: new engine, same files
        history = second.history(sid)
        assert [(m.role, m.content) for m in history] == [
            ("user", "What is the capital of France?"),
            ("assistant", before.response),
        ]
        assert second.session_info(sid).system_prompt == "Be brief."
        after = second.query("And of Germany?", session_id=sid, max_new_tokens=16)
        assert after.usage.cached_tokens >= before.usage.prompt_tokens  # KV written on close, loaded from disk
        assert "Berlin" in after.response
        assert len(second.history(sid)) == 4
