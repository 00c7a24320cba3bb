"""sessionserve-local (LocalClient) and sessionserve-http (Ray Serve, openai client) against the engine alone:
the same workload gives the same replies, KV is reused from the second turn, and the local path reports phases."""

from __future__ import annotations

from benchmarks.chat import PromptRenderer
from benchmarks.runner import RunResult, run_workload
from benchmarks.systems import BenchContext, build_system
from benchmarks.workload import WorkloadSpec, build_workload
from serving.config import EngineConfig

SYSTEMS = ("sessionserve", "sessionserve-local", "sessionserve-http")
NEW_TOKENS = 4


async def test_full_path_systems_answer_like_the_engine(tiny_model, serve_port):
    tokenizer = tiny_model.tokenizer
    workload = build_workload(tokenizer, WorkloadSpec(sessions=2, turns=2, history_tokens=96, user_tokens=(8, 16)))
    renderer = PromptRenderer(tokenizer, 2048)
    engine = EngineConfig(kv_cache_memory="32MiB", host_cache_memory="32MiB")
    context = BenchContext(tiny_model, engine, NEW_TOKENS, ignore_eos=True, serve_port=serve_port)
    results: dict[str, RunResult] = {}
    for name in SYSTEMS:
        system = build_system(name, context)
        await system.start()
        try:
            results[name] = await run_workload(system, workload, renderer, tokenizer, NEW_TOKENS, concurrency=2)
        finally:
            await system.close()

    expected = results["sessionserve"]
    for name in SYSTEMS[1:]:
        result = results[name]
        assert result.replies == expected.replies, name  # the server built the prompts the driver rendered
        for got, want in zip(result.records, expected.records, strict=True):
            assert (got.session_id, got.turn, got.prompt_tokens) == (want.session_id, want.turn, want.prompt_tokens)
            assert got.completion_tokens == NEW_TOKENS and got.ttft_ms > 0 and got.tpot_ms is not None
            assert got.cached_tokens == want.cached_tokens and (got.turn == 0 or got.cached_tokens > 0), name
    local = results["sessionserve-local"].records
    assert all(r.phases_ms is not None and r.phases_ms["forward"] > 0 for r in local)
    assert all(r.phases_ms is None for r in results["sessionserve-http"].records)  # OpenAI chunks carry no phases
