"""Batched token sampling: small pure functions over a [B, V] logits tensor (gpt-fast style).

Independent of any engine: the one-at-a-time engine and the continuous-batching engine both call
`sample`. Each row has its own `SamplingParams`; rows with temperature 0 are greedy (exactly argmax of
the raw logits). Seeded rows draw their randomness only from their own `torch.Generator`, so a seeded
request is reproducible whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from serving.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded from `params.seed`, or None (use torch's global RNG) when unseeded or greedy."""
    if params.seed is None or params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Mask to -inf everything below each row's k-th largest logit; k <= 0 leaves the row alone."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    k_max = int(k.max())
    if k_max <= 0:
        return logits
    values = torch.topk(logits, k_max, dim=-1).values  # [B, k_max], descending
    kth = values.gather(-1, (k.clamp(min=1) - 1).unsqueeze(-1))  # [B, 1]
    kth = torch.where((k > 0).unsqueeze(-1), kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filtering: keep the smallest set of top tokens whose probability reaches p (at least one)."""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
    remove = (before > top_p.unsqueeze(-1)) & active.unsqueeze(-1)
    remove[..., 0] = False  # always keep the most likely token
    mask = torch.zeros_like(remove).scatter(-1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def _exponential_noise(shape: torch.Size, device: torch.device, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Exp(1) noise per row; seeded rows from their own generator, the rest from the global RNG."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    else:
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        if unseeded:
            noise[unseeded] = torch.empty((len(unseeded), shape[-1]), device=device).exponential_()
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)  # never divide by 0


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> Tensor:
    """Pick one token per row of `logits` [B, V]; returns int64 [B]."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(params)} params / {len(generators)} generators"
        )
    greedy_tokens = logits.argmax(dim=-1)
    temperatures = [p.temperature for p in params]
    if all(t <= 0 for t in temperatures):
        return greedy_tokens
    device = logits.device
    greedy = torch.tensor([t <= 0 for t in temperatures], device=device)
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32, device=device)
    scaled = logits.float() / temps.unsqueeze(-1)
    if any(p.top_k > 0 for p in params):
        scaled = apply_top_k(scaled, torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], device=device))
    if any(p.top_p < 1.0 for p in params):
        scaled = apply_top_p(scaled, torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device))
    probs = torch.softmax(scaled, dim=-1)
    # argmax(p / q) with q ~ Exp(1) is a draw from p (the exponential race): one pass, no multinomial
    sampled = (probs / _exponential_noise(probs.shape, device, generators)).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled)
