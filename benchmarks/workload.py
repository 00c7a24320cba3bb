"""Seeded synthetic multi-turn chat, shaped like vLLM's multi-turn benchmark.

One system prompt shared by every session; per session an initial history of about `history_tokens`
tokens (alternating user / assistant messages of generated text); then `turns` user messages of
uniformly drawn lengths. `vllm_multiturn()` gives vLLM's own shape (per-session prefix, 12-18 turns).
Lengths are measured with the real tokenizer, so the counts are controlled, and the same seed always gives
the same messages.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": ..., "content": ...}

_WORD_TEXT = """
the a of and to in is was for on with as by at from that this it be are have has had not but or which
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education river garden window letter paper music market village island road
bridge mountain forest summer winter evening kitchen table chair station train ship harbour castle library
small large old new good great long little young important different early public bad same able late
quiet bright careful simple strange famous gentle sudden ancient modern curious patient honest clever
said made went took came saw knew got gave found thought told became left felt brought began kept held
wrote stood heard let meant set met ran paid sat spoke lay led read grew lost fell sent built understood
walked asked turned opened seemed helped showed called moved lived believed carried remembered wondered
always never often sometimes quickly slowly together again almost perhaps already still soon later here
there because although while before after until since unless whether therefore however meanwhile indeed
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Shape of the synthetic workload; every length is in tokens of the model's tokenizer."""

    sessions: int = 8
    turns: int = 6
    history_tokens: int = 2048  # rendered system prompt + initial history, per session
    system_prompt_tokens: int = 64  # shared by all sessions (part of history_tokens)
    user_tokens: tuple[int, int] = (24, 72)  # each measured user turn, uniform in [min, max]
    history_user_tokens: tuple[int, int] = (32, 128)  # user messages inside the initial history
    history_assistant_tokens: tuple[int, int] = (64, 256)  # assistant messages inside the initial history
    seed: int = 0
    # vLLM's multi-turn shape (preset `vllm-multiturn`): turns per session drawn in [min, max] instead of `turns`,
    # a per-session prefix (lognormal, this mean) opening the first user message, and reply lengths per turn.
    turns_range: tuple[int, int] | None = None
    session_prefix_tokens: int = 0
    reply_tokens: tuple[int, int] | None = None


def vllm_multiturn(sessions: int = 24, seed: int = 0, max_turns: int = 18) -> WorkloadSpec:
    """vLLM's multi-turn benchmark shape: 12-18 turns, a 500-token shared prefix (the system prompt), a per-session
    prefix lognormal around 1,000 tokens, user turns of 120-160 tokens and answers of 80-120 tokens.
    `max_turns` below 18 scales it down for a small machine (turns drawn in [min(12, max_turns), max_turns])."""
    return WorkloadSpec(
        sessions=sessions, turns=max_turns, history_tokens=500, system_prompt_tokens=500, user_tokens=(120, 160),
        seed=seed, turns_range=(min(12, max_turns), max_turns), session_prefix_tokens=1000, reply_tokens=(80, 120),
    )  # fmt: skip


@dataclass(slots=True)
class SessionScript:
    """One session: its initial history and the user messages of the measured turns."""

    session_id: str
    history: list[Message]  # system prompt first, then alternating user / assistant, ending with assistant
    user_turns: list[str]
    history_tokens: int = 0  # rendered length of `history`
    max_new_tokens: list[int] | None = None  # per turn; None: the run's --max-new-tokens


@dataclass(slots=True)
class Workload:
    spec: WorkloadSpec
    system_prompt: str
    sessions: list[SessionScript] = field(default_factory=list)


def token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_token_count(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> int:
    """Tokens of `messages` rendered with the chat template."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return token_count(tokenizer, text)


def _sentences(rng: random.Random) -> Callable[[], str]:
    def sentence() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        words[0] = words[0].capitalize()
        if len(words) > 8 and rng.random() < 0.4:
            words[len(words) // 2] += ","
        return " ".join(words) + rng.choice(".....?!")

    return sentence


def synthetic_text(tokenizer: Any, rng: random.Random, target_tokens: int) -> str:
    """Plausible-looking prose of at most `target_tokens` tokens, short by less than a word (never empty)."""
    if target_tokens <= 0:
        return ""
    sentence = _sentences(rng)
    words: list[str] = []
    while len(words) < target_tokens:  # at least one token per word, so this is always enough words
        words.extend(sentence().split())
    low, high = 1, len(words)  # the largest prefix of words that fits the budget
    while low < high:
        mid = (low + high + 1) // 2
        if token_count(tokenizer, " ".join(words[:mid])) <= target_tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def _lognormal_tokens(rng: random.Random, mean: int) -> int:
    """Lognormal with this mean (sigma 0.5), capped at twice the mean so the longest sessions fit the context."""
    sigma = 0.5
    return min(2 * mean, max(1, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma))))


def _message_overhead(tokenizer: Any) -> int:
    """Template tokens around one message (role header, end marker)."""
    probe = [{"role": "system", "content": "x"}]
    base = chat_token_count(tokenizer, probe)
    return chat_token_count(tokenizer, [*probe, {"role": "user", "content": "x"}]) - base - 1


def _initial_history(
    tokenizer: Any, rng: random.Random, spec: WorkloadSpec, system: Message, overhead: int
) -> tuple[list[Message], int]:
    history = [system]
    used = chat_token_count(tokenizer, history)
    min_pair = spec.history_user_tokens[0] + spec.history_assistant_tokens[0] + 2 * overhead
    while (available := spec.history_tokens - used - 2 * overhead) >= 8:
        user_len = rng.randint(*spec.history_user_tokens)
        assistant_len = rng.randint(*spec.history_assistant_tokens)
        last = available - user_len - assistant_len < min_pair
        if last:  # the last pair absorbs the rest of the budget
            user_len = min(user_len, available // 3)
            assistant_len = available - user_len
        history.append({"role": "user", "content": synthetic_text(tokenizer, rng, user_len)})
        history.append({"role": "assistant", "content": synthetic_text(tokenizer, rng, assistant_len)})
        used = chat_token_count(tokenizer, history)
        if last:
            break
    return history, used


def build_workload(tokenizer: Any, spec: WorkloadSpec) -> Workload:
    """The same `spec` (seed included) always gives the same messages."""
    rng = random.Random(spec.seed)
    # With no initial history (vLLM's shape) the system prompt is all of `history_tokens`, else at most half.
    share = spec.history_tokens if spec.turns_range else spec.history_tokens // 2
    system_prompt = "You are a helpful assistant. Answer briefly. " + synthetic_text(
        tokenizer, rng, min(spec.system_prompt_tokens, share) - 10
    )
    system: Message = {"role": "system", "content": system_prompt}
    overhead = _message_overhead(tokenizer)
    workload = Workload(spec=spec, system_prompt=system_prompt)
    for index in range(spec.sessions):
        session_rng = random.Random(f"{spec.seed}:{index}")  # a session's script does not depend on the others
        if spec.turns_range is None:
            history, used = _initial_history(tokenizer, session_rng, spec, system, overhead)
            turns = spec.turns
        else:  # vLLM's shape: no initial history past the shared system prompt
            history, used = [system], chat_token_count(tokenizer, [system])
            turns = session_rng.randint(*spec.turns_range)
        users = [synthetic_text(tokenizer, session_rng, session_rng.randint(*spec.user_tokens)) for _ in range(turns)]
        if spec.session_prefix_tokens:
            prefix = synthetic_text(tokenizer, session_rng, _lognormal_tokens(session_rng, spec.session_prefix_tokens))
            users[0] = f"{prefix}\n\n{users[0]}"
        replies = [session_rng.randint(*spec.reply_tokens) for _ in range(turns)] if spec.reply_tokens else None
        workload.sessions.append(SessionScript(f"session-{index:04d}", history, users, used, replies))
    return workload
