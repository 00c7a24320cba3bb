"""The Engine contract (stream shape, finish reasons, cancel, KV reuse/crop, fork, release, seeds, validation)
held against PagedEngine and plain transformers `generate`."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from serving.config import EngineConfig
from serving.engine.paged_engine import PagedEngine
from serving.engine.token_ids import common_prefix_length
from serving.engine.types import GenerationChunk, GenerationRequest, KVInfo, SamplingParams, TurnTiming
from tests.support import generate_reference

N = 20  # new tokens per request: enough to see the behaviour, small enough to be quick
QUESTION = "What is the capital of France?"


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def reference(loaded, ids: list[int], n: int = N) -> list[int]:
    return generate_reference(loaded, ids, n)


async def run(engine, request_id: str, ids: list[int], key: str | None = None, **params) -> list[GenerationChunk]:
    params.setdefault("max_new_tokens", N)
    request = GenerationRequest(request_id, list(ids), SamplingParams(**params), cache_key=key)
    return [chunk async for chunk in engine.generate(request)]


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def check_stream(chunks: list[GenerationChunk]) -> None:
    assert chunks and chunks[-1].finish_reason is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert len({(c.prompt_tokens, c.cached_tokens) for c in chunks}) == 1


@pytest.fixture
async def engine(smollm2):
    engine = PagedEngine(smollm2, EngineConfig(kv_cache_memory="64MiB", host_cache_memory="0"))
    yield engine
    await engine.shutdown()


@pytest.fixture
async def tiny(tiny_model):
    engine = PagedEngine(tiny_model, EngineConfig(kv_cache_memory="16MiB", host_cache_memory="0"))
    yield engine
    await engine.shutdown()


@pytest.fixture
def tiny_prompt(tokenizer) -> list[int]:
    return chat_ids(tokenizer, [{"role": "user", "content": "Tell me a story about a dragon."}])


# ------------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.model
async def test_greedy_matches_generate(engine, smollm2, tokenizer):
    ids = chat_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    chunks = await run(engine, "a", ids)
    check_stream(chunks)
    assert "Paris" in text(chunks)
    assert tokens(chunks) == reference(smollm2, ids)
    assert chunks[-1].finish_reason == "stop" and chunks[-1].token_ids == [tokenizer.eos_token_id]
    assert chunks[0].prompt_tokens == len(ids) and chunks[0].cached_tokens == 0
    assert text(chunks) == tokenizer.decode(tokens(chunks), skip_special_tokens=True)


@pytest.mark.model
async def test_multi_turn_kv_reuse_is_exact(engine, smollm2, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    ids1 = chat_ids(tokenizer, messages)
    turn1 = await run(engine, "t1", ids1, key="s")
    assert engine.kv_info("s") == KVInfo(tier="device", tokens=len(ids1) + len(tokens(turn1)) - 1)

    messages += [{"role": "assistant", "content": text(turn1)}, {"role": "user", "content": "And of Germany?"}]
    ids2 = chat_ids(tokenizer, messages)
    assert ids2[: len(ids1)] == ids1
    turn2 = await run(engine, "t2", ids2, key="s")
    check_stream(turn2)
    assert turn2[0].cached_tokens >= len(ids1)
    assert tokens(turn2) == reference(smollm2, ids2)
    assert "Berlin" in text(turn2)


@pytest.mark.model
async def test_stop_strings(engine, tokenizer):
    ids = chat_ids(tokenizer, [{"role": "user", "content": QUESTION}])
    full = text(await run(engine, "full", ids))
    assert full.startswith("The capital of France")
    chunks = await run(engine, "stop", ids, stop=("capital of",))  # " capital" + " of": spans tokens
    check_stream(chunks)
    assert chunks[-1].finish_reason == "stop"
    assert text(chunks) == full[: full.index("capital of")]
    assert tokenizer.decode(tokens(chunks)).endswith(" of")  # the stop string's tokens are not withheld


# ------------------------------------------------------------------------------------- mechanics (tiny model)


async def test_length_and_stateless(tiny, tiny_model, tiny_prompt):
    chunks = await run(tiny, "len", tiny_prompt, max_new_tokens=5)
    check_stream(chunks)
    assert chunks[-1].finish_reason == "length"
    assert all(len(c.token_ids) == 1 for c in chunks) and len(chunks) == 5
    assert tokens(chunks) == reference(tiny_model, tiny_prompt, 5)


async def test_cancel_mid_stream(tiny, tiny_prompt):
    # A high limit so the worker cannot finish before the cancel lands, even on a loaded machine; it stops
    # a few tokens after the cancel.
    got = []
    async for chunk in tiny.generate(GenerationRequest("c", tiny_prompt, SamplingParams(max_new_tokens=500))):
        got.append(chunk)
        if len(got) == 2:
            await tiny.cancel("c")
    assert got[-1].finish_reason == "cancelled"
    assert 2 <= len(got) < 500
    await tiny.cancel("unknown")  # no-op


async def test_closing_the_stream_cancels(tiny, tiny_prompt):
    stream = tiny.generate(GenerationRequest("close", tiny_prompt, SamplingParams(max_new_tokens=24), "k"))
    await anext(stream)
    await stream.aclose()
    # the worker moves on: the next request (same key) runs normally and reuses the partial KV
    chunks = await run(tiny, "after", tiny_prompt, key="k", max_new_tokens=3)
    assert chunks[-1].finish_reason == "length"
    assert chunks[0].cached_tokens == len(tiny_prompt) - 1


async def test_reuse_crop_and_fully_cached_prompt_are_exact(tiny, tiny_model, tiny_prompt, tokenizer):
    first = await run(tiny, "r1", tiny_prompt, key="s", max_new_tokens=8)
    # the same prompt again: fully cached, the last token is recomputed for its logits
    again = await run(tiny, "r2", tiny_prompt, key="s", max_new_tokens=8)
    assert again[0].cached_tokens == len(tiny_prompt) - 1
    assert tokens(again) == tokens(first)
    # a prompt diverging mid-cache: crop to the common prefix
    edited = chat_ids(tokenizer, [{"role": "user", "content": "Tell me a story about a cat."}])
    common = common_prefix_length(edited, tiny_prompt)
    assert 0 < common < len(tiny_prompt) - 1
    chunks = await run(tiny, "r3", edited, key="s", max_new_tokens=8)
    assert chunks[0].cached_tokens == common
    assert tokens(chunks) == reference(tiny_model, edited, 8)


async def test_release_kv_info_fork(tiny, tiny_prompt):
    assert tiny.kv_info("a") == KVInfo(tier="none", tokens=0)
    await run(tiny, "stateless", tiny_prompt, max_new_tokens=4)
    first = await run(tiny, "f1", tiny_prompt, key="a", max_new_tokens=6)
    held = len(tiny_prompt) + 6 - 1  # the last sampled token has no KV yet
    assert tiny.kv_info("a") == KVInfo(tier="device", tokens=held)

    tiny.fork("a", "b")
    assert tiny.kv_info("b") == tiny.kv_info("a")
    follow_up = tiny_prompt + tokens(first)
    from_b = await run(tiny, "f2", follow_up, key="b", max_new_tokens=6)
    assert from_b[0].cached_tokens == held
    assert tiny.kv_info("a").tokens == held  # the fork is a copy: growing b leaves a alone
    from_a = await run(tiny, "f3", follow_up, key="a", max_new_tokens=6)
    assert tokens(from_a) == tokens(from_b)

    assert sorted(tiny.cache_keys()) == ["a", "b"]
    tiny.release("a")
    assert tiny.kv_info("a") == KVInfo(tier="none", tokens=0)
    assert tiny.cache_keys() == ["b"]
    tiny.release("a")  # idempotent
    tiny.fork("a", "b")  # forking nothing leaves the target empty
    assert tiny.kv_info("b").tier == "none"


async def test_seeded_sampling_is_reproducible(tiny, tiny_prompt):
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 50, "seed": 11}
    one = tokens(await run(tiny, "s1", tiny_prompt, **params))
    two = tokens(await run(tiny, "s2", tiny_prompt, **params))
    other = tokens(await run(tiny, "s3", tiny_prompt, **{**params, "seed": 12}))
    assert one == two != other


async def test_concurrent_requests_each_equal_generate(tiny, tiny_model, tiny_prompt):
    results = await asyncio.gather(*(run(tiny, f"p{i}", tiny_prompt, max_new_tokens=4) for i in range(3)))
    expected = reference(tiny_model, tiny_prompt, 4)
    assert all(tokens(r) == expected for r in results)


async def test_rejects_bad_prompts(tiny, tiny_prompt):
    with pytest.raises(ValueError, match="empty"):
        tiny.generate(GenerationRequest("e", []))
    with pytest.raises(ValueError, match="context"):
        tiny.generate(GenerationRequest("l", [1] * tiny.max_context_tokens))
    stream = tiny.generate(GenerationRequest("dup", tiny_prompt, SamplingParams(max_new_tokens=2)))
    with pytest.raises(ValueError, match="already running"):
        tiny.generate(GenerationRequest("dup", tiny_prompt))
    assert [c async for c in stream][-1].finish_reason == "length"


async def test_context_limit(tiny_model, tiny_prompt):
    engine = PagedEngine(tiny_model, EngineConfig(kv_cache_memory="16MiB", max_model_len=len(tiny_prompt) + 3))
    try:
        assert engine.max_context_tokens == len(tiny_prompt) + 3
        chunks = await run(engine, "ctx", tiny_prompt, max_new_tokens=24)
        assert len(tokens(chunks)) == 3 and chunks[-1].finish_reason == "length"
    finally:
        await engine.shutdown()


async def test_engine_fills_the_timing_record_it_is_given(tiny, tiny_prompt):
    """The engine's phases of a request land in the caller's TurnTiming: every step it ran counts."""
    timing = TurnTiming()
    request = GenerationRequest("timed", list(tiny_prompt), SamplingParams(max_new_tokens=4, ignore_eos=True))
    request = dataclasses.replace(request, timing=timing)
    chunks = [chunk async for chunk in tiny.generate(request)]
    assert len(tokens(chunks)) == 4
    assert timing.queue_s >= 0 and timing.schedule_s > 0 and timing.prepare_s > 0
    assert timing.forward_s > 0 and timing.sample_s > 0 and timing.detok_s > 0
    assert timing.forward_s >= tiny.stats()["forward_s"] * 0.99  # the only request: every forward pass was its own
    assert timing.store_read_s == timing.prompt_s == timing.commit_s == timing.total_s == 0  # the service's part
    untimed = [chunk async for chunk in tiny.generate(GenerationRequest("untimed", list(tiny_prompt)))]
    assert untimed[-1].finish_reason is not None  # no record given: nothing to fill, nothing fails
