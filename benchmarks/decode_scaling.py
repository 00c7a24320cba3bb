"""Decode-only throughput of the paged engine core by batch size and context length.

Isolates what batching buys in the decode phase (the multi-turn benchmark mixes in prefill and the HTTP-free
async layer): for each context length, `batch` sequences of that many prompt tokens are prefilled, then only
the decode steps are timed. The ratio batch-N / batch-1 shows how much of a step is shared work (weights)
and how much grows per sequence (attention over its KV blocks).

    .venv/bin/python -m benchmarks.decode_scaling --contexts 300,600 --batches 1,16
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from serving.engine.llm_engine import LLMEngine

console = Console(stderr=True)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--contexts", type=_ints, default=[300, 600], help="prompt tokens per sequence")
    parser.add_argument("--batches", type=_ints, default=[1, 16], help="sequences decoded together")
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def decode_tok_s(engine: LLMEngine, context: int, batch: int, decode_tokens: int) -> float:
    """Prefill `batch` random prompts, then time `decode_tokens` decode-only steps."""
    from serving.engine.types import GenerationRequest, SamplingParams

    rng = random.Random(context * 1000 + batch)
    params = SamplingParams(max_new_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
    for index in range(batch):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(context)]
        engine.add_request(GenerationRequest(f"r{context}-{batch}-{index}", prompt, params))
    while not all(request.num_output_tokens for request in engine.requests.values()):
        engine.step()  # prefill (chunked); each sequence leaves it with its first token
    generated, started = 0, time.perf_counter()
    while engine.has_work():
        generated += sum(len(output.token_ids) for output in engine.step())
    return generated / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from serving.config import EngineConfig, ModelConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.models import load_model

    loaded = load_model(ModelConfig(name=args.model))
    engine = LLMEngine(loaded, EngineConfig(max_batch_size=max(args.batches)))
    decode_tok_s(engine, 32, 1, 4)  # warm-up
    rows = []
    for context in args.contexts:
        rates = {batch: decode_tok_s(engine, context, batch, args.decode_tokens) for batch in args.batches}
        rows += [{"context": context, "batch": b, "tok_s": round(r, 1)} for b, r in rates.items()]
        console.log(f"context {context}: " + ", ".join(f"batch {b} {r:.1f} tok/s" for b, r in rates.items()))
    table = Table("context", "batch", "decode tok/s", f"x batch {args.batches[0]}", title="decode scaling")
    base = {row["context"]: row["tok_s"] for row in rows if row["batch"] == args.batches[0]}
    for row in rows:
        table.add_row(
            str(row["context"]), str(row["batch"]), f"{row['tok_s']:.1f}", f"{row['tok_s'] / base[row['context']]:.1f}"
        )
    Console().print(table)
    if args.out:
        args.out.write_text(
            json.dumps({"config": vars(args) | {"out": str(args.out)}, "results": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
