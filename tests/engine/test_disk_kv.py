"""The disk tier: KV past the host budget and across restarts, bound to the tokens it encodes (tiny model, CPU).

Every reply is compared with plain transformers `generate`: KV from disk must be exact, and a file that does not
match the prompt (another session's, truncated, another model's, an edited history) must be recomputed, not served.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading

import pytest

from serving.engine.disk_kv import Snapshot, hash_chain, matching_tokens
from serving.engine.paged_engine import PagedEngine
from serving.engine.types import KVInfo
from tests.engine.test_paged_engine import PROMPT_A, PROMPT_B, chat_ids, reference, run, tiny_config, tokens


@pytest.fixture
async def engines(tiny_model, tmp_path):
    """Engines on the tiny model sharing one KV dir (a restart = shut one down, start another)."""
    started: list[PagedEngine] = []

    def make(loaded=tiny_model, **config) -> PagedEngine:
        started.append(PagedEngine(loaded, tiny_config(**config), kv_dir=tmp_path / "kv"))
        return started[-1]

    yield make
    for engine in started:
        await engine.shutdown()


async def first_turn(engine: PagedEngine, prompt: list[int], key: str) -> list[int]:
    """Run a first turn; return the next turn's prompt (this one + the reply + a few new tokens)."""
    reply = tokens(await run(engine, f"{key}1", prompt, key=key, max_new_tokens=8))
    return [*prompt, *reply, 5, 6, 7, 8]


def test_stored_kv_matches_a_prompt_to_the_token_and_only_when_its_tokens_hash_to_its_chain():
    stored = list(range(10))
    chain = hash_chain("m", stored, 4)  # blocks of 4, 4 and a partial 2
    assert len(chain) == 3
    assert matching_tokens("m", chain, stored, [*range(10), 99], 4) == 10
    assert matching_tokens("m", chain, stored, [*range(9), 99], 4) == 9  # the partial block differs at its end
    assert matching_tokens("m", chain, stored, [0, 1, 2, 3, 4, 77, 6, 7, 8, 9], 4) == 5  # mid-block, to the token
    assert matching_tokens("m", chain, stored, list(range(7)), 4) == 7  # a shorter prompt: all of it
    assert matching_tokens("other model", chain, stored, list(range(10)), 4) == 0
    assert matching_tokens("m", chain, [0, 1, 2, 3, 4, 5, 6, 7, 8, 42], [*range(9), 42], 4) == 0  # ids not the chain's
    assert matching_tokens("m", chain, stored, [], 4) == 0


async def test_past_the_host_budget_a_session_goes_to_disk_and_back_exactly(engines, tiny_model):
    engine = engines(device_blocks=12, host_blocks=4)
    second = await first_turn(engine, PROMPT_A, "a")
    await run(engine, "b1", PROMPT_B, key="b", max_new_tokens=8)  # a: device -> no room on the host -> disk
    assert engine.kv_info("a") == KVInfo(tier="disk", tokens=31)
    assert engine.core.disk is not None and engine.core.disk.flush(10)
    assert engine.core.disk.path("a").exists()
    a2 = await run(engine, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 31 and a2[0].kv_source == "disk"
    assert tokens(a2) == reference(tiny_model, second, 6)
    stats = engine.stats()
    assert stats["spilled_sessions"] >= 1 and stats["disk_restored_sessions"] == 1 and stats["dropped_sessions"] == 0


async def test_a_session_read_back_while_its_write_is_in_flight_is_served_from_memory(engines, tiny_model):
    engine = engines(device_blocks=12, host_blocks=4)
    second = await first_turn(engine, PROMPT_A, "a")
    disk = engine.core.disk
    assert disk is not None
    write, go = disk._write, threading.Event()

    def slow_write(key: str, snapshot: Snapshot) -> None:  # the writer thread waits until the test lets it
        go.wait(30)
        write(key, snapshot)

    disk._write = slow_write  # type: ignore[method-assign]
    try:
        await run(engine, "b1", PROMPT_B, key="b", max_new_tokens=8)
        assert engine.kv_info("a").tier == "disk" and not disk.path("a").exists()  # not written yet...
        a2 = await run(engine, "a2", second, key="a", max_new_tokens=6)  # ...so its snapshot serves this turn
    finally:
        go.set()
    assert a2[0].cached_tokens == 31 and tokens(a2) == reference(tiny_model, second, 6)


async def test_a_restarted_engine_reuses_the_kv_written_at_shutdown(engines, tiny_model):
    first = engines()
    second = await first_turn(first, PROMPT_A, "a")
    assert first.kv_info("a").tier == "device"
    await first.shutdown()  # idle sessions' device KV goes to disk
    restarted = engines()
    assert "a" in restarted.cache_keys()  # known from its file
    a2 = await run(restarted, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 31 and a2[0].kv_source == "disk" and not a2[0].kv_stale
    assert tokens(a2) == reference(tiny_model, second, 6)
    restarted.release("a")  # destroy: the file goes too
    assert restarted.core.disk is not None and not restarted.core.disk.path("a").exists()


async def test_another_sessions_file_in_place_is_recomputed_not_served(engines, tiny_model):
    first = engines()
    second = await first_turn(first, PROMPT_A, "a")
    await first_turn(first, PROMPT_B, "b")
    await first.shutdown()
    disk = first.core.disk
    assert disk is not None
    shutil.copy(disk.path("b"), disk.path("a"))
    restarted = engines()
    a2 = await run(restarted, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 0 and a2[0].kv_source == "none" and a2[0].kv_stale
    assert tokens(a2) == reference(tiny_model, second, 6)
    assert restarted.stats()["disk_rejected"] == 1


async def test_a_truncated_file_is_recomputed_not_served(engines, tiny_model):
    first = engines()
    second = await first_turn(first, PROMPT_A, "a")
    await first.shutdown()
    assert first.core.disk is not None
    path = first.core.disk.path("a")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    restarted = engines()
    a2 = await run(restarted, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 0 and a2[0].kv_stale and tokens(a2) == reference(tiny_model, second, 6)
    assert not path.exists()  # unusable: deleted


async def test_kv_written_by_another_model_is_recomputed_not_served(engines, tiny_model):
    first = engines(loaded=dataclasses.replace(tiny_model, name="builtin:another-model"))
    second = await first_turn(first, PROMPT_A, "a")
    await first.shutdown()
    restarted = engines()
    a2 = await run(restarted, "a2", second, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 0 and a2[0].kv_stale and tokens(a2) == reference(tiny_model, second, 6)


async def test_an_edited_history_reuses_only_the_tokens_before_the_edit(engines, tiny_model):
    first = engines()
    second = await first_turn(first, PROMPT_A, "a")
    await first.shutdown()
    edited = [*second[:10], 4242, *second[11:]]  # token 10 changed, the third of block 2 (blocks of 4)
    restarted = engines()
    a2 = await run(restarted, "a2", edited, key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 10 and tokens(a2) == reference(tiny_model, edited, 6)  # to the token


@pytest.mark.model
async def test_smollm2_turn_after_a_restart_from_disk_equals_generate(smollm2, tokenizer, tmp_path):
    from serving.config import EngineConfig

    config = EngineConfig(kv_cache_memory="64MiB", host_cache_memory="16MiB")
    first_ids = chat_ids(tokenizer, "What is the capital of France?")
    engine = PagedEngine(smollm2, config, kv_dir=tmp_path)
    reply = tokens(await run(engine, "t1", first_ids, key="chat", max_new_tokens=8))
    await engine.shutdown()
    follow = tokenizer("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n").input_ids
    second_ids = first_ids + reply + follow
    restarted = PagedEngine(smollm2, config, kv_dir=tmp_path)
    try:
        second = await run(restarted, "t2", second_ids, key="chat", max_new_tokens=8)
    finally:
        await restarted.shutdown()
    assert second[0].cached_tokens == len(first_ids) + len(reply) - 1 and second[0].kv_source == "disk"
    assert tokens(second) == reference(smollm2, second_ids, 8)


async def test_past_the_disk_budget_the_least_recently_used_file_goes(engines, tiny_model):
    engine = engines(device_blocks=12, host_blocks=0)
    disk = engine.core.disk
    assert disk is not None
    nexts = {}
    for key, start in (("a", 1000), ("b", 2000), ("c", 3000), ("d", 4000)):  # each pushes the one before to disk
        nexts[key] = await first_turn(engine, list(range(start, start + 24)), key)
        assert disk.flush(10)
        if key == "b":  # a's file is written: from now on the budget holds two and a half such files
            disk.budget_bytes = disk.path("a").stat().st_size * 5 // 2
    assert not disk.path("a").exists() and disk.path("b").exists() and disk.path("c").exists()
    assert engine.stats()["disk_evicted"] == 1
    a2 = await run(engine, "a2", nexts["a"], key="a", max_new_tokens=6)
    assert a2[0].cached_tokens == 0 and tokens(a2) == reference(tiny_model, nexts["a"], 6)
    assert disk.flush(10)  # a's turn pushed d to disk, and b (now least recently used) out
    assert not disk.path("b").exists() and disk.path("c").exists() and disk.path("d").exists()
    c2 = await run(engine, "c2", nexts["c"], key="c", max_new_tokens=6)
    assert c2[0].cached_tokens == 31 and tokens(c2) == reference(tiny_model, nexts["c"], 6)
