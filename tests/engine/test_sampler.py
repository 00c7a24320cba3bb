from __future__ import annotations

import pytest
import torch

from serving.engine.sampler import apply_top_k, apply_top_p, make_generator, sample
from serving.engine.types import SamplingParams

VOCAB = 100


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.randn(4, VOCAB) * 3


def draw(logits: torch.Tensor, params: SamplingParams, n: int = 1) -> list[int]:
    generator = make_generator(params)
    return [int(sample(logits[:1], [params], [generator])[0]) for _ in range(n)]


def test_greedy_is_argmax(logits):
    params = [SamplingParams()] * logits.shape[0]
    assert torch.equal(sample(logits, params, [None] * len(params)), logits.argmax(-1))


def test_top_k_1_is_greedy(logits):
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(logits.shape[0])]
    generators = [make_generator(p) for p in params]
    for _ in range(5):
        assert torch.equal(sample(logits, params, generators), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_seed_dependent(logits):
    flat = torch.zeros(1, VOCAB)  # uniform: any two seeds agreeing 20 times is ~impossible
    first = draw(flat, SamplingParams(temperature=1.0, seed=7), 20)
    assert first == draw(flat, SamplingParams(temperature=1.0, seed=7), 20)
    assert first != draw(flat, SamplingParams(temperature=1.0, seed=8), 20)
    assert len(set(first)) > 5


def test_seeded_row_does_not_depend_on_batch(logits):
    seeded = SamplingParams(temperature=1.0, seed=3)
    alone = int(sample(logits[:1], [seeded], [make_generator(seeded)])[0])
    mixed_params = [seeded, SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.7, seed=9)]
    generators = [make_generator(p) for p in mixed_params]
    batched = sample(logits, mixed_params, generators)
    assert int(batched[0]) == alone
    assert int(batched[2]) == int(logits[2].argmax())  # a greedy row in a sampled batch stays exact


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    filtered = apply_top_p(logits, torch.tensor([0.7]))
    assert torch.isfinite(filtered[0, :2]).all() and torch.isinf(filtered[0, 2:]).all()
    # a tiny p still keeps the most likely token
    assert torch.isfinite(apply_top_p(logits, torch.tensor([1e-6]))).tolist() == [[True, False, False, False]]
    # p = 1 is a no-op
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0])), logits)
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    assert set(draw(logits, params, 200)) == {0, 1}


def test_top_k_is_per_row(logits):
    filtered = apply_top_k(logits, torch.tensor([1, 5, 0, VOCAB + 10]))
    finite = torch.isfinite(filtered).sum(-1).tolist()
    assert finite == [1, 5, VOCAB, VOCAB]
    top5 = set(logits[1].topk(5).indices.tolist())
    assert set(torch.nonzero(torch.isfinite(filtered[1])).flatten().tolist()) == top5


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cold = draw(logits, SamplingParams(temperature=0.05, seed=1), 100)
    hot = draw(logits, SamplingParams(temperature=5.0, seed=1), 100)
    assert set(cold) == {0}
    assert len(set(hot)) > 1


def test_shape_mismatch_is_rejected(logits):
    with pytest.raises(ValueError):
        sample(logits, [SamplingParams()], [None])
