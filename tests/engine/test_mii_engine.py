"""`engine.kind: mii` on the CPU: the request/response translation as plain functions, and `MiiCore` behind
`PagedEngine` over a stand-in for DeepSpeed's InferenceEngineV2 (CUDA-only, so it is the one thing replaced):
the tiny real model with one transformers KV cache per uid, kept until `flush(uid)`, which is FastGen's contract.
The real engine runs in tests/gpu/test_mii_gpu.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from serving.config import EngineConfig
from serving.engine.mii_engine import REQUIREMENT, MiiCore, finish_reason, load_fastgen, plan_put
from serving.engine.paged_engine import PagedEngine
from serving.engine.types import GenerationRequest, SamplingParams
from tests.support import generate_reference


def test_plan_put_sends_only_the_new_tail_of_a_session():
    assert plan_put([], [1, 2, 3]) == (False, [1, 2, 3])  # a new session
    assert plan_put([1, 2, 3], [1, 2, 3, 4, 5]) == (False, [4, 5])  # the next turn: KV reused
    assert plan_put([1, 2, 3], [1, 9, 3, 4]) == (True, [1, 9, 3, 4])  # edited history: flush, re-prefill
    assert plan_put([1, 2, 3], [1, 2, 3]) == (True, [1, 2, 3])  # nothing new: the last logits must be recomputed


def test_finish_reason_follows_the_paged_engine_rules():
    eos, params = frozenset({2}), SamplingParams(max_new_tokens=3)
    assert finish_reason(2, False, 1, 10, params, eos, 100) == "stop"
    assert finish_reason(2, False, 1, 10, SamplingParams(max_new_tokens=3, ignore_eos=True), eos, 100) is None
    assert finish_reason(5, True, 1, 10, params, eos, 100) == "stop"  # a stop string matched
    assert finish_reason(5, False, 3, 10, params, eos, 100) == "length"
    assert finish_reason(5, False, 1, 100, params, eos, 100) == "length"  # the context is full
    assert finish_reason(5, False, 1, 10, params, eos, 100) is None


def test_without_cuda_the_mii_engine_fails_naming_the_requirement():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the failure path is the no-CUDA one")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU and DeepSpeed-MII: pip install 'sessionserve\[mii\]'"):
        load_fastgen("unused", EngineConfig())
    assert "sessionserve[mii]" in REQUIREMENT


class StandInEngineV2:
    """InferenceEngineV2's put/flush/can_schedule on a transformers model (one KV cache per uid)."""

    def __init__(self, model, max_tokens: int) -> None:
        self.model, self.max_tokens = model, max_tokens
        self.caches: dict[int, DynamicCache] = {}
        self.put_tokens = 0

    def put(self, uids, tokens):
        rows = []
        with torch.inference_mode():
            for uid, ids in zip(uids, tokens, strict=True):
                cache = self.caches.setdefault(uid, DynamicCache(config=self.model.config))
                out = self.model(input_ids=ids[None], past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1])
                self.put_tokens += len(ids)
        return torch.stack(rows)

    def flush(self, uid: int) -> None:
        self.caches.pop(uid, None)

    def can_schedule(self, uids, lengths) -> str:
        held = sum(c.get_seq_length() for u, c in self.caches.items())
        return "SchedulingResult.Success" if held + sum(lengths) <= self.max_tokens else "KVCacheLimitExceeded"


async def run(engine, request_id, ids, key=None, n=6):
    request = GenerationRequest(request_id, list(ids), SamplingParams(max_new_tokens=n), cache_key=key)
    return [chunk async for chunk in engine.generate(request)]


def tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


async def test_sessions_keep_their_kv_across_turns_and_equal_generate(tiny_model):
    stand_in = StandInEngineV2(tiny_model.model, max_tokens=10_000)
    engine = PagedEngine(None, core=MiiCore(stand_in, tiny_model.tokenizer, tiny_model.model, 2048, device="cpu"))
    try:
        first_ids = list(range(1000, 1030))
        first = await run(engine, "t1", first_ids, key="s")
        assert tokens(first) == generate_reference(tiny_model, first_ids, 6)
        assert engine.kv_info("s").tokens == len(first_ids) + 5  # the last reply token is not put yet
        second_ids = [*first_ids, *tokens(first), 7, 8, 9]
        put_before = stand_in.put_tokens
        second = await run(engine, "t2", second_ids, key="s")
        assert second[0].cached_tokens == len(first_ids) + 5
        assert stand_in.put_tokens - put_before == 4 + 5  # the new tail, then one token per decode step
        assert tokens(second) == generate_reference(tiny_model, second_ids, 6)
        edited = [5, *second_ids[1:]]
        third = await run(engine, "t3", edited, key="s")
        assert third[0].cached_tokens == 0 and tokens(third) == generate_reference(tiny_model, edited, 6)
        stateless = await run(engine, "t4", first_ids)
        assert tokens(stateless) == tokens(first) and engine.cache_keys() == ["s"]
        engine.release("s")
        assert engine.kv_info("s").tier == "none" and stand_in.caches == {}
    finally:
        await engine.shutdown()


async def test_a_full_pool_flushes_the_least_recent_idle_session(tiny_model):
    stand_in = StandInEngineV2(tiny_model.model, max_tokens=80)
    engine = PagedEngine(None, core=MiiCore(stand_in, tiny_model.tokenizer, tiny_model.model, 2048, device="cpu"))
    try:
        await run(engine, "a", list(range(1000, 1040)), key="a")
        await run(engine, "b", list(range(2000, 2040)), key="b")  # 45 + 45 > 80: a is flushed
        assert engine.kv_info("a").tier == "none" and engine.kv_info("b").tier == "device"
        assert engine.stats()["flushed_sessions"] == 1
    finally:
        await engine.shutdown()
