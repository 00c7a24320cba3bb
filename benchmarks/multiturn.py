"""Multi-turn chat benchmark: `python -m benchmarks.multiturn --systems ... --out results.json`.

Loads the model once, builds one seeded workload, then runs each system in turn (one at a time, each in
its own event loop, after one uncounted warm-up request) and writes the JSON described in benchmarks/README.md
plus a PNG of TTFT by turn next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import report
from benchmarks.chat import PromptRenderer
from benchmarks.runner import RunResult, run_workload
from benchmarks.systems import SYSTEM_NAMES, BenchContext, build_system
from benchmarks.workload import WorkloadSpec, build_workload, vllm_multiturn

DEFAULTS: dict[str, Any] = {"sessions": 8, "turns": 6, "history_tokens": 2048, "max_new_tokens": 32}
QUICK: dict[str, Any] = {"sessions": 4, "turns": 3, "history_tokens": 256, "max_new_tokens": 12}  # < 3 min, 4 systems
DEFAULT_SYSTEMS = ("sessionserve", "sessionserve-nokv", "hf-generate", "hf-cb")  # full-path systems: ask by name
REFERENCE_SYSTEM = "hf-generate"  # other systems' replies are compared with its replies
EOS_STOPS = "stops a reply in every system (lengths recorded; TPOT is per token)"
EOS_IGNORED = "ignored by every system (--ignore-eos): every reply is max_new_tokens long"

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # logs: no wrapped table


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multiturn", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma-separated, of {', '.join(SYSTEM_NAMES)} (default {','.join(DEFAULT_SYSTEMS)})",
    )
    parser.add_argument("--sessions", type=int, help=f"concurrent chat sessions (default {DEFAULTS['sessions']})")
    parser.add_argument("--turns", type=int, help=f"measured user turns per session (default {DEFAULTS['turns']})")
    parser.add_argument(
        "--history-tokens",
        type=int,
        help=f"initial history per session incl. system prompt ({DEFAULTS['history_tokens']})",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"reply length cap, greedy (default {DEFAULTS['max_new_tokens']})"
    )
    parser.add_argument("--user-tokens", type=_pair, default=(24, 72), help="MIN,MAX tokens of each measured user turn")
    parser.add_argument("--system-prompt-tokens", type=int, default=64, help="shared system prompt length")
    parser.add_argument("--concurrency", type=int, help="sessions in flight at once (default: all of them)")
    parser.add_argument(
        "--in-flight",
        type=int,
        help="requests in flight at once (default: one per session); the other live sessions wait between turns, "
        "like users reading a reply, and keep their KV",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every reply is exactly --max-new-tokens long (decode-throughput runs: batches stay full)",
    )
    parser.add_argument(
        "--kv-cache-memory", help="device KV budget of every pooled system, e.g. 512MiB (default: engine's)"
    )
    parser.add_argument("--kv-grace-s", type=float, help="sessionserve's engine.kv_grace_s (default: engine's)")
    parser.add_argument("--max-wait-s", type=float, help="sessionserve's engine.max_wait_s (default: engine's)")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--request-timeout-s", type=float, default=1800, help="a system whose request takes longer fails"
    )
    parser.add_argument(
        "--workload",
        choices=("synthetic", "vllm-multiturn"),
        default="synthetic",
        help="synthetic: the flags above; vllm-multiturn: vLLM's multi-turn shape (24 sessions of 12-18 turns, "
        "500-token shared prefix, per-session prefix lognormal around 1,000 tokens, user turns 120-160 tokens, "
        "answers 80-120 tokens, so --ignore-eos); --sessions and --turns (at most) scale it down",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=0.0,
        help="Poisson arrivals: each session sends its next request an exponential delay of mean 1/RATE s after "
        "its previous reply (vLLM's per-client rate); 0 = at once",
    )
    parser.add_argument(
        "--ingress",
        choices=("proxy", "direct", "replica", "haproxy"),
        default="direct",
        help="sessionserve-http: direct (what `serve` runs on a Ray it starts): the ingress replica serves HTTP "
        "itself, or proxy: through Ray Serve's HTTP proxy, or replica: the model replica serves HTTP itself, or "
        "haproxy: HAProxy in front of the ingress replica (serving.ingress)",
    )
    parser.add_argument("--quick", action="store_true", help=f"small preset for a smoke run: {QUICK}")
    parser.add_argument("--out", type=Path, default=Path("results.json"), help="JSON path; the PNG goes next to it")
    parser.add_argument("--verbose", action="store_true", help="show transformers' and the engine's log messages")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    if args.workload == "vllm-multiturn":  # the spec's own lengths; answers are exact lengths, as in vLLM's run
        spec = vllm_multiturn()
        preset = {"sessions": spec.sessions, "turns": spec.turns, "history_tokens": spec.history_tokens}
        preset["max_new_tokens"] = max(spec.reply_tokens or (0, DEFAULTS["max_new_tokens"]))
        args.ignore_eos = True
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = args.concurrency or args.sessions
    args.in_flight = args.in_flight or args.concurrency
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in args.systems if name not in SYSTEM_NAMES]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEM_NAMES)}")
    return args


async def _run_system(
    name: str, context: BenchContext, args: argparse.Namespace, workload: Any, renderer: PromptRenderer, tick: Callable
) -> tuple[RunResult, dict[str, Any]]:
    system = build_system(name, context)
    await system.start()
    try:
        result = await run_workload(
            system,
            workload,
            renderer,
            context.loaded.tokenizer,
            args.max_new_tokens,
            args.concurrency,
            tick,
            args.request_timeout_s,
            in_flight=args.in_flight,
            request_rate=args.request_rate,
        )
        return result, system.info()
    finally:
        await system.close()


def _replies_match(results: dict[str, RunResult]) -> dict[str, dict[str, Any]]:
    """Per system, the fraction of (session, turn) replies identical to the reference system's (greedy, fp32)."""
    reference = REFERENCE_SYSTEM if REFERENCE_SYSTEM in results else next(iter(results), None)
    if reference is None:
        return {}
    expected = [reply for replies in results[reference].replies.values() for reply in replies]
    matches: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        got = [reply for replies in result.replies.values() for reply in replies]
        same = sum(a == b for a, b in zip(got, expected, strict=False))
        matches[name] = {"reference": reference, "fraction": round(same / max(1, len(expected)), 4)}
    return matches


def _print_table(document: dict[str, Any]) -> None:
    table = Table(title="multi-turn benchmark (ms; TTFT by turn is p50 over sessions)")
    columns = ("system", "TTFT p50", "p90", "p99", "turn 0", "last turn", "TPOT p50", "tok/s", "wall s", "cached")
    for column in (*columns, "outside fwd"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, s in document["systems"].items():
        if "error" in s:
            table.add_row(name, "[red]failed")  # the error follows the table
            continue
        by_turn = s["ttft_ms_by_turn"]
        outside = s.get("outside_forward_fraction_p50", {}).get("of_client_e2e")
        table.add_row(
            name,
            *(str(v) for v in (s["ttft_ms"]["p50"], s["ttft_ms"]["p90"], s["ttft_ms"]["p99"], by_turn[0], by_turn[-1])),
            *(str(v) for v in (s["tpot_ms"]["p50"], s["throughput_tok_s"], s["wall_s"], s["cached_fraction"])),
            "-" if outside is None else f"{outside:.1%}",
        )
    console.print(table)
    for name, s in document["systems"].items():
        if "error" in s:
            console.print(f"[red]{name} failed: {s['error']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import transformers

    from serving.config import EngineConfig, ModelConfig
    from serving.models import load_model

    if not args.verbose:
        transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    loaded = load_model(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    knobs = {"kv_cache_memory": args.kv_cache_memory, "kv_grace_s": args.kv_grace_s, "max_wait_s": args.max_wait_s}
    engine_config = EngineConfig(**{name: value for name, value in knobs.items() if value is not None})
    if args.workload == "vllm-multiturn":
        spec = vllm_multiturn(args.sessions, args.seed, args.turns)
    else:
        spec = WorkloadSpec(
            sessions=args.sessions, turns=args.turns, history_tokens=args.history_tokens,
            system_prompt_tokens=args.system_prompt_tokens, user_tokens=args.user_tokens, seed=args.seed,
        )  # fmt: skip
    workload = build_workload(loaded.tokenizer, spec)
    spec_user = spec.user_tokens[1] + spec.session_prefix_tokens * 2  # the first turn carries the session prefix
    max_context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 1 << 30)
    renderer = PromptRenderer(loaded.tokenizer, max_context)
    longest = spec.history_tokens + spec_user + spec.turns * (spec.user_tokens[1] + args.max_new_tokens + 16)
    tokens_bound = args.sessions * args.turns * (longest + args.max_new_tokens) + 1024  # + warm-up
    if longest > max_context:
        console.print(f"[yellow]warning: prompts may reach ~{longest} tokens, over the model's {max_context}")
    document: dict[str, Any] = {
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "verbose", "quick")},
            "quick": args.quick,
            "kv_cache_memory_bytes": engine_config.kv_cache_memory,
            "engine_config": engine_config.model_dump(),
            "workload": dataclasses.asdict(spec),
            "history_tokens_actual": [s.history_tokens for s in workload.sessions],
            "prompt_renderer": renderer.name,
            "greedy": True,
            "eos": EOS_IGNORED if args.ignore_eos else EOS_STOPS,
            "dtype": str(loaded.dtype).removeprefix("torch."),
        },
        "machine": report.machine_info(str(loaded.device)),
        "systems": {},
    }
    results: dict[str, RunResult] = {}
    failed = False
    progress = Progress(
        TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    with progress:
        for name in args.systems:
            task = progress.add_task(name, total=sum(len(s.user_turns) for s in workload.sessions))
            context = BenchContext(
                loaded, engine_config, args.max_new_tokens, tokens_bound, args.ignore_eos, ingress=args.ingress
            )
            attn = loaded.model.config._attn_implementation
            try:
                result, info = asyncio.run(
                    _run_system(name, context, args, workload, renderer, lambda t=task: progress.advance(t))
                )
            except Exception as error:
                failed = True
                document["systems"][name] = {"error": f"{type(error).__name__}: {error}"}
                console.print(f"[red]{name} failed:[/red]\n{traceback.format_exc()}")
                continue
            finally:
                if loaded.model.config._attn_implementation != attn:  # a system must not leak its attention switch
                    loaded.model.set_attn_implementation(attn)
            results[name] = result
            document["systems"][name] = summary = {**report.summarize(result, args.turns), "info": info}
            progress.console.print(
                f"{name}: TTFT p50 by turn {summary['ttft_ms_by_turn']} ms, wall {summary['wall_s']} s"
            )
    for name, match in _replies_match(results).items():
        document["systems"][name]["replies_match"] = match
    document["config"]["total_s"] = round(time.perf_counter() - started, 1)
    report.write_json(args.out, document)
    png = args.out.with_suffix(".png")
    report.plot_ttft_by_turn(png, document)
    _print_table(document)
    console.print(f"wrote {args.out} and {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
