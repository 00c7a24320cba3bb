"""End to end: `python -m benchmarks.multiturn` on the tiny random model writes the contract JSON and the PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.paths import REPO

CONTRACT_FIELDS = ("ttft_ms", "ttft_ms_by_turn", "tpot_ms", "throughput_tok_s", "wall_s")


def test_cli_writes_json_and_png(tmp_path, smollm2_dir):
    pytest.importorskip("matplotlib")
    systems = ["sessionserve", "sessionserve-nokv", "hf-generate", "hf-cb"]
    out = tmp_path / "results.json"
    command = [
        sys.executable, "-m", "benchmarks.multiturn", "--systems", ",".join(systems),
        "--model", "builtin:tiny-random-llama", "--sessions", "2", "--turns", "2", "--history-tokens", "64",
        "--max-new-tokens", "4", "--ignore-eos", "--in-flight", "1", "--kv-cache-memory", "64MiB", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    document = json.loads(out.read_text())
    assert document["config"]["sessions"] == 2 and document["config"]["in_flight"] == 1
    assert document["config"]["ignore_eos"] and "ignored" in document["config"]["eos"]
    assert document["config"]["kv_cache_memory_bytes"] == 64 * 2**20
    assert {"cpu", "cores", "torch", "transformers"} <= document["machine"].keys()
    assert list(document["systems"]) == systems
    for name, result in document["systems"].items():
        assert "error" not in result, (name, result)
        assert set(CONTRACT_FIELDS) <= result.keys(), name
        assert result["ttft_ms"]["p50"] > 0 and result["ttft_ms"]["p90"] >= result["ttft_ms"]["p50"]
        assert len(result["ttft_ms_by_turn"]) == 2 and all(v > 0 for v in result["ttft_ms_by_turn"])
        assert result["tpot_ms"]["p50"] > 0 and result["throughput_tok_s"] > 0 and result["wall_s"] > 0
        assert result["requests"] == 4 and result["completion_tokens"] == 4 * 4  # --ignore-eos: all replies full
        assert result["replies_match"]["reference"] == "hf-generate"
    assert document["systems"]["sessionserve"]["info"]["engine"] == "PagedEngine"
    assert document["systems"]["sessionserve"]["cached_tokens_by_turn"][1] > 0  # turn 1 reuses the session's KV
    assert document["systems"]["sessionserve-nokv"]["cached_tokens"] == 0
    assert document["systems"]["hf-cb"]["info"]["use_prefix_sharing"] is True
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_preset_yields_to_explicit_flags():
    from benchmarks.multiturn import QUICK, parse_args

    args = parse_args(["--quick", "--sessions", "3", "--systems", "hf-generate,hf-cb"])
    assert args.sessions == 3 and args.turns == QUICK["turns"] and args.history_tokens == QUICK["history_tokens"]
    assert args.concurrency == 3 and args.in_flight == 3 and args.systems == ["hf-generate", "hf-cb"]
    assert parse_args(["--sessions", "8", "--in-flight", "2"]).in_flight == 2
    assert parse_args(["--ignore-eos"]).ignore_eos and not args.ignore_eos
    with pytest.raises(SystemExit):
        parse_args(["--systems", "vllm"])
