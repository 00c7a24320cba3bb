"""The continuous-batching engine against plain transformers `generate` (fp32, greedy, CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serving.config import EngineConfig, ModelConfig
from serving.engine.paged_engine import PagedEngine
from serving.engine.types import EngineFailed, GenerationChunk, GenerationRequest, KVInfo, SamplingParams
from serving.models import SMOLLM2, LoadedModel, load_model
from tests.support import BF16_LOGIT_TOLERANCE, generate_reference, logit_gap

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
]


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)[
        "input_ids"
    ]


def reference(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    return generate_reference(loaded, ids, n)


async def run(engine, request_id: str, ids: list[int], key: str | None = None, **params) -> list[GenerationChunk]:
    request = GenerationRequest(request_id, list(ids), SamplingParams(**params), cache_key=key)
    return [chunk async for chunk in engine.generate(request)]


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def tiny_config(device_blocks: int = 256, host_blocks: int = 256, **overrides) -> EngineConfig:
    block = 2 * 2 * 4 * 2 * 16 * 4  # layers * (K, V) * block_size * kv_heads * head_dim * fp32 bytes
    values = {"block_size": 4, "kv_cache_memory": device_blocks * block, "host_cache_memory": host_blocks * block}
    return EngineConfig(**(values | overrides))


@pytest.fixture
async def smol(smollm2):
    engine = PagedEngine(smollm2, EngineConfig(kv_cache_memory="128MiB", host_cache_memory="64MiB"))
    yield engine
    await engine.shutdown()
    assert smollm2.model.config._attn_implementation == "sdpa"  # given back


# ------------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.model
async def test_eight_sessions_batched_equal_alone_and_generate(smol, smollm2, tokenizer):
    n = 10
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    alone = [tokens(await run(smol, f"alone{i}", ids, max_new_tokens=n)) for i, ids in enumerate(prompts)]
    steps_before = smol.stats()["steps"]
    batched = await asyncio.gather(
        *(run(smol, f"b{i}", ids, key=f"s{i}", max_new_tokens=n) for i, ids in enumerate(prompts))
    )
    assert smol.stats()["steps"] - steps_before <= n + 1  # one forward pass per token for all eight
    for i, ids in enumerate(prompts):
        assert tokens(batched[i]) == alone[i] == reference(smollm2, ids, n), QUESTIONS[i]
        assert batched[i][-1].finish_reason in ("stop", "length")
        assert smol.kv_info(f"s{i}").tier == "device"


@pytest.mark.model
async def test_ignore_eos_generates_past_eos_like_generate_without_eos(smollm2, tokenizer):
    ids = chat_ids(tokenizer, "What is the capital of France?")
    engine = PagedEngine(smollm2, EngineConfig(kv_cache_memory="64MiB", host_cache_memory="0"))
    try:
        stopped = await run(engine, "eos", ids, max_new_tokens=24)
        forced = await run(engine, "no-eos", ids, max_new_tokens=24, ignore_eos=True)
    finally:
        await engine.shutdown()
    assert stopped[-1].finish_reason == "stop" and len(tokens(stopped)) < 24  # the reply ends with EOS
    assert forced[-1].finish_reason == "length" and len(tokens(forced)) == 24
    assert tokens(forced)[: len(tokens(stopped))] == tokens(stopped)
    with torch.inference_mode():
        out = smollm2.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24, do_sample=False, eos_token_id=[],
        )  # fmt: skip
    assert tokens(forced) == out[0, len(ids) :].tolist()


@pytest.mark.model
async def test_multi_turn_reuses_kv_and_equals_generate(smol, smollm2, tokenizer):
    first_ids = chat_ids(tokenizer, QUESTIONS[0])
    first = await run(smol, "t1", first_ids, key="chat", max_new_tokens=8)
    reply = tokens(first)
    assert smol.kv_info("chat") == KVInfo(tier="device", tokens=len(first_ids) + len(reply) - 1)
    follow = tokenizer("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n").input_ids
    second_ids = first_ids + reply + follow
    second = await run(smol, "t2", second_ids, key="chat", max_new_tokens=8)
    assert second[0].cached_tokens == len(first_ids) + len(reply) - 1 >= len(first_ids)
    assert second[0].prompt_tokens == len(second_ids)
    assert tokens(second) == reference(smollm2, second_ids, 8)


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_dir) -> LoadedModel:
    return load_model(ModelConfig(name=SMOLLM2, device="cpu", dtype="bfloat16"))


@pytest.mark.model
@pytest.mark.parametrize("backend", ["cpu", "portable"])
async def test_bf16_on_the_cpu_picks_tokens_within_the_logit_tolerance(smollm2_bf16, tokenizer, monkeypatch, backend):
    """Four chats batched, then a warm turn over one's cached KV. bf16 tokens may differ from `generate`'s at near
    ties (as on a GPU, tests/gpu): each must score within the tolerance of the step's best logit under the dense
    bf16 model's own logits for the same sequence."""
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", backend)
    engine = PagedEngine(smollm2_bf16, EngineConfig(kv_cache_memory="32MiB", host_cache_memory="0"))
    try:
        assert engine.core.runner.backend.name == backend
        prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:4]]
        first = await asyncio.gather(
            *(run(engine, f"b{i}", ids, key=f"s{i}", max_new_tokens=12) for i, ids in enumerate(prompts))
        )
        follow = tokenizer("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n").input_ids
        second_ids = prompts[0] + tokens(first[0]) + follow
        second = await run(engine, "warm", second_ids, key="s0", max_new_tokens=12)
    finally:
        await engine.shutdown()
    assert second[0].cached_tokens >= len(prompts[0])
    for ids, chunks in [*zip(prompts, first, strict=True), (second_ids, second)]:
        gap = logit_gap(smollm2_bf16, ids, tokens(chunks))
        assert gap <= BF16_LOGIT_TOLERANCE, f"a token {gap:.3f} below the best logit"


# ------------------------------------------------------------------------------------- mechanics (tiny model)


@pytest.fixture
async def tiny_engines(tiny_model):
    engines = []

    def make(config: EngineConfig) -> PagedEngine:
        engines.append(PagedEngine(tiny_model, config))
        return engines[-1]

    yield make
    for engine in engines:
        await engine.shutdown()


PROMPT_A = list(range(1000, 1024))
PROMPT_B = list(range(2000, 2024))


async def test_chunked_prefill_and_batching_equal_generate(tiny_engines, tiny_model):
    engine = tiny_engines(tiny_config(max_batch_tokens=16))
    prompts = [list(range(3000 + 50 * i, 3000 + 50 * i + 7 + 9 * i)) for i in range(5)]  # 7..43 tokens
    outs = await asyncio.gather(*(run(engine, f"r{i}", p, max_new_tokens=6) for i, p in enumerate(prompts)))
    for p, out in zip(prompts, outs, strict=True):
        assert tokens(out) == reference(tiny_model, p, 6)
    assert engine.stats()["device_blocks_used"] == 0


async def test_session_offloaded_to_host_and_back_is_exact(tiny_engines, tiny_model):
    engine = tiny_engines(tiny_config(device_blocks=12, host_blocks=16))
    a1 = tokens(await run(engine, "a1", PROMPT_A, key="a", max_new_tokens=8))  # 31 tokens of KV: 8 blocks
    await run(engine, "b1", PROMPT_B, key="b", max_new_tokens=8)  # needs 8 blocks: a moves to the host
    assert engine.kv_info("a") == KVInfo(tier="host", tokens=31)
    assert engine.kv_info("b") == KVInfo(tier="device", tokens=31)
    second = [*PROMPT_A, *a1, 5, 6, 7, 8]
    a2 = await run(engine, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 31
    assert tokens(a2) == reference(tiny_model, second, 6)
    assert engine.kv_info("b").tier == "host"  # b made room for a's return
    stats = engine.stats()
    assert stats["offloaded_sessions"] == 2 and stats["restored_sessions"] == 1
    assert stats["device_blocks_used"] <= 12 and stats["host_blocks_used"] <= 16


@pytest.mark.parametrize("host_blocks", [4, 0])  # 0: no host tier configured at all
async def test_session_dropped_past_the_host_budget_is_recomputed_exactly(tiny_engines, tiny_model, host_blocks):
    engine = tiny_engines(tiny_config(device_blocks=12, host_blocks=host_blocks))
    a1 = tokens(await run(engine, "a1", PROMPT_A, key="a", max_new_tokens=8))
    await run(engine, "b1", PROMPT_B, key="b", max_new_tokens=8)
    assert engine.kv_info("a") == KVInfo(tier="none", tokens=0)
    second = [*PROMPT_A, *a1, 5, 6, 7, 8]
    a2 = await run(engine, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 0
    assert tokens(a2) == reference(tiny_model, second, 6)
    assert engine.stats()["dropped_sessions"] >= 1


async def test_fork_continues_exactly_as_its_parent(tiny_engines, tiny_model):
    engine = tiny_engines(tiny_config())
    first = tokens(await run(engine, "p1", PROMPT_A, key="parent", max_new_tokens=6))  # 29 tokens: partial block
    engine.fork("parent", "child")
    assert engine.kv_info("child") == engine.kv_info("parent") == KVInfo(tier="device", tokens=29)
    follow = [*PROMPT_A, *first, 9, 10, 11]
    child, parent = await asyncio.gather(
        run(engine, "c2", follow, key="child", max_new_tokens=6),
        run(engine, "p2", follow, key="parent", max_new_tokens=6),
    )
    assert tokens(child) == tokens(parent) == reference(tiny_model, follow, 6)
    assert child[0].cached_tokens == parent[0].cached_tokens == 29
    assert engine.stats()["cow_copies"] == 1  # the shared partial block was copied once, by whoever wrote first


async def test_cancel_frees_non_session_blocks(tiny_engines):
    engine = tiny_engines(tiny_config())
    stream = engine.generate(GenerationRequest("c", PROMPT_A, SamplingParams(max_new_tokens=500), cache_key="s"))
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            await engine.cancel("c")
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 50
    info = engine.kv_info("s")
    assert info.tier == "device" and info.tokens >= len(PROMPT_A) + 2  # the session keeps what was computed
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["device_blocks_used"] == -(-info.tokens // 4)
    stateless = engine.generate(GenerationRequest("d", PROMPT_B, SamplingParams(max_new_tokens=500)))
    async for _ in stateless:
        break
    await stateless.aclose()  # closing the stream cancels
    for _ in range(100):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["device_blocks_used"] == -(-info.tokens // 4)
    assert engine.cache_keys() == ["s"]  # the stateless request held nothing after it ended
    engine.release("s")
    assert engine.stats()["device_blocks_used"] == 0 and engine.kv_info("s").tier == "none"
    assert engine.cache_keys() == []


@pytest.mark.slow  # ~13 s
async def test_a_thousand_sessions_leave_the_pools_as_they_found_them(tiny_engines):
    engine = tiny_engines(tiny_config(device_blocks=8, host_blocks=2, max_batch_size=4))
    before = engine.stats()

    async def cycle(i: int) -> None:
        prompt = [100 + i % 50, 7, 8, 9 + i % 3][: 2 + i % 3]
        out = await run(engine, f"r{i}", prompt, key=f"s{i}", max_new_tokens=1 + i % 2)
        assert out[-1].finish_reason in ("length", "stop")
        assert engine.kv_info(f"s{i}").tier in ("device", "host", "none")
        stats = engine.stats()
        assert stats["device_blocks_used"] <= 8 and stats["host_blocks_used"] <= 2

    for start in range(0, 1000, 4):  # sessions stay idle for two rounds: offloaded, then dropped
        await asyncio.gather(*(cycle(i) for i in range(start, start + 4)))
        for i in range(start - 8, start - 4):
            engine.release(f"s{i}")
    for i in range(992, 1000):
        engine.release(f"s{i}")
    after = engine.stats()
    assert after["device_blocks_used"] == before["device_blocks_used"] == 0
    assert after["host_blocks_used"] == 0 and engine.core.kv_manager.sessions == {}
    assert after["generated_tokens"] == 1500 and after["cached_tokens"] == 0
    assert after["offloaded_sessions"] > 0 and after["dropped_sessions"] > 0


async def test_stop_strings_and_seeded_sampling(tiny_engines, tokenizer):
    engine = tiny_engines(tiny_config())
    free = await run(engine, "free", PROMPT_A, max_new_tokens=12)
    text = "".join(c.text for c in free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = await run(engine, "cut", PROMPT_A, max_new_tokens=12, stop=(stop,))
    assert cut[-1].finish_reason == "stop" and "".join(c.text for c in cut) == text[: text.index(stop)]
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    alone = tokens(await run(engine, "s1", PROMPT_B, **params))
    together = await asyncio.gather(run(engine, "s2", PROMPT_B, **params), run(engine, "s3", PROMPT_A, **params))
    assert tokens(together[0]) == alone


async def test_invalid_requests_raise(tiny_engines):
    engine = tiny_engines(tiny_config(device_blocks=8))
    assert engine.max_context_tokens == 32
    with pytest.raises(ValueError):
        engine.generate(GenerationRequest("long", list(range(32))))
    with pytest.raises(ValueError):
        engine.generate(GenerationRequest("empty", []))
    out = await run(engine, "fits", list(range(30)), max_new_tokens=10)
    assert len(tokens(out)) == 2 and out[-1].finish_reason == "length"  # cut at the context


# ------------------------------------------------------------------------------------- other architectures


def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(
        name="test", model=model.eval(), tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32
    )


def _small(config_class, tokenizer, **extra):
    torch.manual_seed(0)
    common = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    common |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    return config_class(**(common | extra))


async def test_qwen2_is_served_exactly(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    loaded = _loaded(Qwen2ForCausalLM(_small(Qwen2Config, tokenizer)), tokenizer)
    engine = PagedEngine(loaded, tiny_config(max_batch_tokens=16))
    try:
        outs = await asyncio.gather(
            run(engine, "a", PROMPT_A, max_new_tokens=5), run(engine, "b", PROMPT_B[:9], max_new_tokens=5)
        )
        assert tokens(outs[0]) == reference(loaded, PROMPT_A, 5)
        assert tokens(outs[1]) == reference(loaded, PROMPT_B[:9], 5)
    finally:
        await engine.shutdown()


async def test_sliding_window_no_longer_caps_the_context(tokenizer, caplog):
    from transformers import MistralConfig, MistralForCausalLM

    loaded = _loaded(MistralForCausalLM(_small(MistralConfig, tokenizer, sliding_window=32, head_dim=16)), tokenizer)
    engine = PagedEngine(loaded, tiny_config())
    try:
        assert engine.max_context_tokens == 512  # the model's own context: sliding layers attend through a window
        assert "capped" not in caplog.text
        assert tokens(await run(engine, "a", PROMPT_A, max_new_tokens=8)) == reference(loaded, PROMPT_A, 8)
        long_prompt = list(range(4000, 4100))
        assert tokens(await run(engine, "b", long_prompt, max_new_tokens=8)) == reference(loaded, long_prompt, 8)
    finally:
        await engine.shutdown()


LONG = [5000 + (7 * i) % 900 for i in range(220)]  # 220 tokens: far past a 16-token window


def _windowed(kind: str, tokenizer):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
    )

    mixed = {"sliding_window": 16, "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"]}
    if kind == "gemma3-mixed":
        return Gemma3ForCausalLM(_small(Gemma3TextConfig, tokenizer, **mixed))
    if kind == "mistral-sliding":
        return MistralForCausalLM(_small(MistralConfig, tokenizer, sliding_window=16, head_dim=16))
    # Gemma-2 soft-capping; scores scaled up so that the cap bites on a random model (checked below)
    model = Gemma2ForCausalLM(_small(Gemma2Config, tokenizer, attn_logit_softcapping=1.0, **mixed))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 10
            layer.self_attn.k_proj.weight *= 10
    return model


@pytest.mark.parametrize("backend", ["portable", "cpu"])
@pytest.mark.parametrize("kind", ["gemma3-mixed", "mistral-sliding", "gemma2-softcap"])
async def test_sliding_and_softcapped_attention_past_the_window_equal_generate(tokenizer, monkeypatch, kind, backend):
    """200+ tokens of context, batched with a short prompt, chunked prefill, then a warm turn over cached KV and an
    edited one; an all-sliding model holds only the window's KV."""
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", backend)
    loaded = _loaded(_windowed(kind, tokenizer), tokenizer)
    engine = PagedEngine(loaded, tiny_config(max_batch_tokens=48))
    try:
        assert engine.core.runner.backend.name == backend
        first, short = await asyncio.gather(
            run(engine, "long", LONG, key="s", max_new_tokens=8), run(engine, "short", PROMPT_B, max_new_tokens=8)
        )
        assert tokens(first) == reference(loaded, LONG, 8)
        assert tokens(short) == reference(loaded, PROMPT_B, 8)
        # the session's 227 tokens of KV: every block where a layer attends to all of it, the window's otherwise
        held = engine.core.kv_manager.device.num_used
        assert held == (5 if kind == "mistral-sliding" else 57)  # 16-token window: keys 211..226, blocks 52..56
        second_ids = [*LONG, *tokens(first), *range(6000, 6030)]  # 30 new tokens over 227 cached
        second = await run(engine, "warm", second_ids, key="s", max_new_tokens=8)
        assert second[0].cached_tokens == len(LONG) + 7
        assert tokens(second) == reference(loaded, second_ids, 8)
        edited = [*LONG[:100], *range(7000, 7010)]  # diverges at 100: an all-sliding model no longer holds 85..99
        third = await run(engine, "edit", edited, key="s", max_new_tokens=8)
        assert third[0].cached_tokens == (0 if kind == "mistral-sliding" else 100)
        assert tokens(third) == reference(loaded, edited, 8)
    finally:
        await engine.shutdown()
    if kind == "gemma2-softcap":  # the cap changes this model's output: the test above can fail without it
        loaded.model.config.attn_logit_softcapping = None
        for layer in loaded.model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert reference(loaded, LONG, 8) != tokens(first)


def test_unsupported_attention_is_refused(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _small(LlamaConfig, tokenizer, head_dim=16, attention_chunk_size=8)
    with pytest.raises(ValueError, match="attention_chunk_size"):
        PagedEngine(_loaded(LlamaForCausalLM(config), tokenizer), tiny_config())


async def test_a_failing_step_fails_requests_and_reports_the_engine_unhealthy(tiny_engines):
    engine = tiny_engines(tiny_config())
    assert engine.health() is None
    before = await run(engine, "ok", PROMPT_A, max_new_tokens=2)
    assert before[-1].finish_reason == "length"

    def broken_forward(out):
        raise RuntimeError("injected forward failure")

    engine.core.runner.execute = broken_forward
    results = await asyncio.gather(
        *(run(engine, f"f{i}", PROMPT_B, key=f"s{i}", max_new_tokens=4) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, EngineFailed) and "injected forward failure" in str(r) for r in results), results
    assert "injected forward failure" in engine.health()
    with pytest.raises(EngineFailed, match="injected forward failure"):
        engine.generate(GenerationRequest("later", PROMPT_A, SamplingParams(max_new_tokens=1)))
