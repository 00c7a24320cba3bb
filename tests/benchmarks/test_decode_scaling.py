"""`python -m benchmarks.decode_scaling` on the tiny random model: decodes exactly what it times, writes JSON."""

from __future__ import annotations

import json

from benchmarks.decode_scaling import decode_tok_s, main
from serving.config import EngineConfig
from serving.engine.llm_engine import LLMEngine


def test_decode_scaling_writes_a_rate_for_every_context_and_batch(tmp_path, smollm2_dir):
    out = tmp_path / "scaling.json"
    main(["--model", "builtin:tiny-random-llama", "--contexts", "20,40", "--batches", "1,3", "--decode-tokens", "4",
          "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [(row["context"], row["batch"]) for row in rows] == [(20, 1), (20, 3), (40, 1), (40, 3)]
    assert all(row["tok_s"] > 0 for row in rows)


def test_every_timed_sequence_runs_to_its_full_length(tiny_model):
    engine = LLMEngine(tiny_model, EngineConfig(kv_cache_memory="16MiB", host_cache_memory=0))
    assert decode_tok_s(engine, context=24, batch=3, decode_tokens=5) > 0
    assert engine.counters["generated_tokens"] == 3 * 6  # ignore_eos: the first token + 5 timed, each
    assert not engine.requests and engine.kv_manager.device.num_used == 0
