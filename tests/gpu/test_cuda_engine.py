"""The engine's exactness suite on CUDA (gpu-marked; skipped where no CUDA device exists).

Run on a GPU machine with `make test-gpu` (README, "Running on a GPU"): no Ray, no network, SmolLM2-135M's
shape with random weights (`builtin:smollm2-135m-random`), every attention backend that can serve.
- fp32 with TF32 off: batched == alone == transformers `generate`, token for token, and so are the offload
  (device -> pinned host -> device) and fork (copy-on-write) round trips.
- bf16 (the `device: auto` default): reduction order differs between kernels, so tokens may differ at near
  ties. Checked instead: each token the engine picks scores, under the dense model's own logits for the same
  sequence, within BF16_LOGIT_TOLERANCE of that step's best token.

`make test-gpu GPU_TEST_DEVICE=cpu` runs the same tests on the CPU (tiny model: minutes, not hours) to check
the suite and the make target themselves where no GPU is.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from serving.config import EngineConfig, ModelConfig
from serving.engine.attention_backend import installed_packages
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_runner import kv_shape
from serving.engine.types import GenerationRequest, SamplingParams
from serving.models import SMOLLM2_RANDOM, LoadedModel, load_model
from tests.support import BF16_LOGIT_TOLERANCE, generate_reference, logit_gap

DEVICE = os.environ.get("SESSIONSERVE_GPU_TEST_DEVICE", "cuda")
MODEL = os.environ.get("SESSIONSERVE_GPU_TEST_MODEL", SMOLLM2_RANDOM)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device: none is visible to torch here"
    ),
]

FP32_BACKENDS = ["portable", "flex"]  # flash-attn serves fp16/bf16 only
BF16_BACKENDS = FP32_BACKENDS + (["flash_attn"] if "flash_attn" in installed_packages() else [])


@pytest.fixture(scope="module")
def fp32_model() -> LoadedModel:
    torch.backends.cuda.matmul.allow_tf32 = False  # token equality needs fp32 GEMMs, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False
    return load_model(ModelConfig(name=MODEL, device=DEVICE, dtype="float32"))


@pytest.fixture(scope="module")
def bf16_model() -> LoadedModel:
    return load_model(ModelConfig(name=MODEL, device=DEVICE, dtype="bfloat16"))


@pytest.fixture
def engine_for(monkeypatch):
    engines: list[LLMEngine] = []

    def make(loaded: LoadedModel, backend: str, **config: object) -> LLMEngine:
        monkeypatch.setenv("SESSIONSERVE_ATTENTION", backend)
        # a pool of a few hundred blocks either way (eager flex on the CPU scores every pool slot)
        pool = "256MiB" if DEVICE == "cuda" else "4MiB"
        values: dict[str, object] = {"kv_cache_memory": pool, "host_cache_memory": pool} | config
        engines.append(LLMEngine(loaded, EngineConfig(**values)))
        assert engines[-1].runner.backend.name == backend
        return engines[-1]

    yield make
    for engine in engines:
        engine.runner.close()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randrange(5, 300))] for _ in range(count)]


def run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Submit all, step the engine until it is idle; each request's tokens."""
    for request in requests:
        engine.add_request(request)
    out: dict[str, list[int]] = {request.request_id: [] for request in requests}
    while engine.has_work():
        for chunk in engine.step():
            out[chunk.request_id] += chunk.token_ids
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def reference(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    return generate_reference(loaded, ids, n, eos_token_id=[])  # ignore_eos: n tokens whatever they are


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_fp32_batched_equals_alone_equals_generate(engine_for, fp32_model, backend):
    engine = engine_for(fp32_model, backend)
    n, ids = 12, prompts(8)
    alone = [run(engine, [GenerationRequest(f"a{i}", p, greedy(n))])[f"a{i}"] for i, p in enumerate(ids)]
    batched = run(engine, [GenerationRequest(f"b{i}", p, greedy(n), cache_key=f"s{i}") for i, p in enumerate(ids)])
    for i, p in enumerate(ids):
        assert batched[f"b{i}"] == alone[i] == reference(fp32_model, p, n), f"prompt {i} ({len(p)} tokens)"


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_fp32_offload_to_pinned_host_and_back_is_exact(engine_for, fp32_model, backend):
    layers, kv_heads, head_dim = kv_shape(fp32_model.model.config)
    block_bytes = layers * 2 * 16 * kv_heads * head_dim * 4  # (K, V) * block_size * fp32
    engine = engine_for(fp32_model, backend, kv_cache_memory=24 * block_bytes, host_cache_memory="64MiB")
    a, b = prompts(2, seed=1)
    a, b = a[:150] + [7] * max(0, 150 - len(a)), b[:150] + [8] * max(0, 150 - len(b))  # 10 blocks each
    first = run(engine, [GenerationRequest("a1", a, greedy(8), cache_key="a")])["a1"]
    run(engine, [GenerationRequest("b1", b, greedy(8), cache_key="b")])
    run(engine, [GenerationRequest("c1", b[::-1], greedy(8), cache_key="c")])  # 3 x 10 blocks > 24: a leaves
    assert engine.kv_info("a").tier == "host"
    second = [*a, *first, 11, 12, 13]
    assert run(engine, [GenerationRequest("a2", second, greedy(8), cache_key="a")])["a2"] == reference(
        fp32_model, second, 8
    )
    stats = engine.stats()
    assert stats["offloaded_sessions"] >= 1 and stats["restored_sessions"] >= 1


@pytest.mark.parametrize("backend", FP32_BACKENDS)
def test_fp32_fork_continues_exactly_as_its_parent(engine_for, fp32_model, backend):
    engine = engine_for(fp32_model, backend)
    (ids,) = prompts(1, seed=2)
    first = run(engine, [GenerationRequest("p1", ids, greedy(6), cache_key="parent")])["p1"]
    engine.fork("parent", "child")
    follow = [*ids, *first, 9, 10, 11]
    both = run(
        engine,
        [
            GenerationRequest("c2", follow, greedy(6), cache_key="child"),
            GenerationRequest("p2", follow, greedy(6), cache_key="parent"),
        ],
    )
    assert both["c2"] == both["p2"] == reference(fp32_model, follow, 6)


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_tokens_are_best_within_the_logit_tolerance(engine_for, bf16_model, backend):
    block_size = 256 if backend == "flash_attn" else 16
    engine = engine_for(bf16_model, backend, block_size=block_size)
    n, ids = 12, prompts(4, seed=3)
    out = run(engine, [GenerationRequest(f"r{i}", p, greedy(n)) for i, p in enumerate(ids)])
    for i, p in enumerate(ids):
        gap = logit_gap(bf16_model, p, out[f"r{i}"])
        assert gap <= BF16_LOGIT_TOLERANCE, f"prompt {i}: a token {gap:.3f} below the best logit"
