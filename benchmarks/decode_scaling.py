"""Decode-only throughput of the paged engine core by batch size and context length, against a roofline.

Isolates what batching buys in the decode phase (the multi-turn benchmark mixes in prefill and the HTTP-free
async layer): for each context length, `batch` sequences of that many prompt tokens are set up, then only the
decode steps are timed. The ratio batch-N / batch-1 shows how much of a step is shared work (weights) and how
much grows per sequence (attention over its KV blocks).

Prompts are set up without running the model by default (`--prefill synthetic`: the KV of all but the last
prompt token is written into the pool with random values; decode reads it exactly as it would read computed
KV, and a 16 x 4,096-token prefill would take minutes on a small CPU); `--prefill model` prefills for real.

Each step (the median step time, robust to bursts of load on a shared machine; the best and the overall tok/s
are printed too) is compared with a roofline printed with it:
    max((bytes of weights + KV read once) / read bandwidth, FLOPs / GEMM rate)
the read bandwidth measured at the start (summing a large tensor), the GEMM rate from a weights-only forward of
the same batch (one token per sequence, no KV). `--backends cpu,portable` runs attention backends side by side
(same model, same prompts, interleaved) for an A/B in one run.

On a machine shared with other jobs, wall time measures the neighbours as much as the engine. `--clock cpu` runs
torch on one thread and times everything (steps, bandwidth, GEMM rate) in that thread's CPU time, which other
processes taking the CPU do not inflate (they still share the memory bandwidth): use it for A/B comparisons there.

    .venv/bin/python -m benchmarks.decode_scaling --contexts 2048,4096 --batches 1,16 --backends cpu,portable
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from serving.engine.llm_engine import LLMEngine
    from serving.models import LoadedModel

console = Console(stderr=True)
clock = time.perf_counter  # time.thread_time with --clock cpu


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16")
    parser.add_argument("--contexts", type=_ints, default=[2048, 4096], help="prompt tokens per sequence")
    parser.add_argument("--batches", type=_ints, default=[1, 16], help="sequences decoded together")
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per run")
    parser.add_argument(
        "--kv-cache-memory", default=None, help="device KV pool (e.g. 4GiB); default: just enough for the largest run"
    )
    parser.add_argument(
        "--backends",
        default="auto",
        help="attention backends to compare, e.g. cpu,portable or flex,portable (auto: the engine's choice)",
    )
    parser.add_argument("--prefill", choices=["synthetic", "model"], default="synthetic")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (context, batch, backend); best reported")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: torch's threads, wall time; cpu: one thread, its CPU time (A/B on a busy shared machine)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def _synthetic_prefill(engine: LLMEngine) -> None:
    """Mark every waiting request's prompt but its last token as computed, with random KV in its blocks."""
    import torch

    pool = engine.runner.kv_pool
    for request in list(engine.scheduler.waiting):
        cached = request.num_tokens - 1
        if not (engine.kv_manager.attach(request) and engine.kv_manager.allocate_slots(request, cached)):
            raise RuntimeError("the KV pool is too small for this run: raise --kv-cache-memory")
        request.num_computed_tokens = cached
        ids = torch.tensor(request.block_ids, device=pool.device)
        shape = (*pool.shape[:2], len(request.block_ids), *pool.shape[3:])
        pool.index_copy_(2, ids, torch.randn(shape, dtype=pool.dtype, device=pool.device))


def decode_tok_s(
    engine: LLMEngine,
    context: int,
    batch: int,
    decode_tokens: int,
    synthetic: bool = False,
    step_times: list[float] | None = None,
) -> float:
    """Set up `batch` random prompts, then time `decode_tokens` decode-only steps (each appended to `step_times`)."""
    from serving.engine.types import GenerationRequest, SamplingParams

    rng = random.Random(context * 1000 + batch)
    params = SamplingParams(max_new_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(context)]
        engine.add_request(GenerationRequest(f"r{context}-{batch}-{index}", prompt, params))
    if synthetic:
        _synthetic_prefill(engine)
    while not all(request.num_output_tokens for request in engine.requests.values()):
        engine.step()  # prefill (chunked); each sequence leaves it with its first token
    generated, started = 0, clock()
    while engine.has_work():
        step_started = clock()
        generated += sum(len(output.token_ids) for output in engine.step())
        if step_times is not None:
            step_times.append(clock() - step_started)
    return generated / (clock() - started)


# ------------------------------------------------------------------------------------------------ roofline


def _synchronize(device: Any) -> None:
    """Wait for queued GPU work, so that a timer around it measures the work (no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: Any, nbytes: int = 2**29) -> float:
    """Bytes per second summing a tensor much larger than the caches, on `device` (best of 5)."""
    import torch

    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    data.sum()
    best = float("inf")
    for _ in range(5):
        _synchronize(device)
        started = clock()
        data.sum()
        _synchronize(device)
        best = min(best, clock() - started)
    return nbytes / best


def _gemm_params(loaded: LoadedModel) -> int:
    """Weights used as GEMM operands per token: every Linear (lm_head included, even when tied to embeddings)."""
    import torch

    return sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))


def gemm_rate(loaded: LoadedModel, batch: int) -> float:
    """FLOP/s of the model's own GEMMs: a forward of `batch` one-token sequences with no KV (best of 5, warm)."""
    import torch

    ids = torch.zeros(batch, 1, dtype=torch.long, device=loaded.device)
    best = float("inf")
    with torch.inference_mode():
        loaded.model(input_ids=ids, use_cache=False)  # warm-up: first-call initialisation is not the GEMMs' rate
        for _ in range(5):
            _synchronize(loaded.device)
            started = clock()
            loaded.model(input_ids=ids, use_cache=False)
            _synchronize(loaded.device)
            best = min(best, clock() - started)
    return 2 * _gemm_params(loaded) * batch / best


def roofline_s(loaded: LoadedModel, context: int, batch: int, bandwidth: float, rate: float) -> dict[str, float]:
    from serving.engine.model_runner import kv_shape

    config = loaded.model.config
    layers, kv_heads, head_dim = kv_shape(config)
    itemsize = loaded.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())  # tied weights counted once
    kv = layers * 2 * batch * context * kv_heads * head_dim * itemsize
    attention_flops = 4 * batch * context * config.num_attention_heads * head_dim * layers
    flops = 2 * _gemm_params(loaded) * batch + attention_flops
    return {"bytes": weights + kv, "flops": flops, "roofline_s": max((weights + kv) / bandwidth, flops / rate)}


# ------------------------------------------------------------------------------------------------ main


def _engines(loaded: LoadedModel, names: list[str], config: Any) -> dict[str, LLMEngine]:
    from serving.engine.attention_backend import make_backend
    from serving.engine.llm_engine import LLMEngine
    from serving.engine.model_runner import ModelRunner

    engines = {}
    for name in names:
        backend = None
        if name != "auto":
            blocks = ModelRunner.device_blocks(loaded, config)
            backend = make_backend(name, config.block_size, blocks, loaded.device)
        engine = LLMEngine(loaded, config, backend=backend)
        engines[engine.runner.backend.name] = engine
    return engines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.clock == "cpu":
        import torch

        global clock
        torch.set_num_threads(1)  # thread_time counts the calling thread only: the whole step must run in it
        clock = time.thread_time
    from serving.config import EngineConfig, ModelConfig
    from serving.engine.model_runner import kv_shape
    from serving.models import load_model

    loaded = load_model(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    bandwidth = read_bandwidth(loaded.device)
    rates = {batch: gemm_rate(loaded, batch) for batch in args.batches}
    console.log(
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s; GEMM rate "
        + ", ".join(f"batch {b} {r / 1e9:.1f} GFLOP/s" for b, r in rates.items())
    )
    kv_memory = args.kv_cache_memory
    if kv_memory is None:  # room for the largest run (+ a block per sequence of slack)
        layers, kv_heads, head_dim = kv_shape(loaded.model.config)
        per_token = layers * 2 * kv_heads * head_dim * loaded.dtype.itemsize
        tokens = max(args.batches) * (max(args.contexts) + args.decode_tokens + 2 * EngineConfig().block_size)
        kv_memory = tokens * per_token
    config = EngineConfig(max_batch_size=max(args.batches), kv_cache_memory=kv_memory, host_cache_memory=0)
    engines = _engines(loaded, args.backends.split(","), config)
    for engine in engines.values():
        decode_tok_s(engine, 32, 1, 4)  # warm-up (builds and loads kernels)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            runs: dict[str, list[float]] = {name: [] for name in engines}
            steps: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits every backend alike
                for name, engine in engines.items():
                    synthetic = args.prefill == "synthetic"
                    runs[name].append(decode_tok_s(engine, context, batch, args.decode_tokens, synthetic, steps[name]))
            bound = roofline_s(loaded, context, batch, bandwidth, rates[batch])
            for name, rates_seen in runs.items():
                tok_s = max(rates_seen)
                # the median step: robust to bursts of load from other processes on a shared machine
                step_s = statistics.median(steps[name])
                rows.append(
                    {"context": context, "batch": batch, "backend": name, "tok_s": round(tok_s, 1)}
                    | {"runs_tok_s": [round(r, 1) for r in rates_seen]}
                    | {"step_ms": round(step_s * 1e3, 2), "best_step_ms": round(min(steps[name]) * 1e3, 2)}
                    | {"roofline_ms": round(bound["roofline_s"] * 1e3, 2)}
                    | {"vs_roofline": round(step_s / bound["roofline_s"], 2)}
                )
            console.log(
                f"context {context} batch {batch}: "
                + ", ".join(f"{name} {max(r):.1f} tok/s" for name, r in runs.items())
                + f" (roofline {bound['roofline_s'] * 1e3:.1f} ms/step)"
            )
    first = args.batches[0]
    table = Table(
        "context", "batch", "backend", "decode tok/s", "median step ms", "best step ms", "roofline ms",
        "median step / roofline", f"x batch {first} (tok/s)", f"x batch {first} (median step)", title="decode scaling",
    )  # fmt: skip
    base = {(row["context"], row["backend"]): row for row in rows if row["batch"] == first}
    for row in rows:
        one = base[(row["context"], row["backend"])]
        table.add_row(
            str(row["context"]), str(row["batch"]), row["backend"], f"{row['tok_s']:.1f}", f"{row['step_ms']:.1f}",
            f"{row['best_step_ms']:.1f}", f"{row['roofline_ms']:.1f}", f"{row['vs_roofline']:.2f}",
            f"{row['tok_s'] / one['tok_s']:.1f}", f"{row['batch'] * one['step_ms'] / row['step_ms']:.1f}",
        )  # fmt: skip
    Console(width=200).print(table)
    for engine in engines.values():
        engine.runner.close()
    if args.out:
        machine = {"read_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": {b: r / 1e9 for b, r in rates.items()}}
        args.out.write_text(
            json.dumps({"config": vars(args) | {"out": str(args.out)}, "machine": machine, "results": rows}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
