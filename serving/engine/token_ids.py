"""Token-id helpers both engines share: EOS ids, prefix matching, request validation (plain Python)."""

from __future__ import annotations

from collections.abc import Sequence

from serving.engine.types import GenerationRequest


def eos_token_ids(tokenizer: object, model: object) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's plus the generation config's (which may be a list)."""
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for candidate in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if candidate is not None:
            ids.update([candidate] if isinstance(candidate, int) else candidate)
    return frozenset(int(i) for i in ids)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def validate_request(request: GenerationRequest, max_context: int, vocab_size: int) -> None:
    """Refuse, with a clear ValueError, a request that can never run (the service checks earlier; this guards)."""
    ids = request.prompt_token_ids
    if not ids:
        raise ValueError("prompt is empty: at least one token is needed")
    if len(ids) >= max_context:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the engine's context is {max_context}: "
            "it must leave room for at least one new token"
        )
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if request.params.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
