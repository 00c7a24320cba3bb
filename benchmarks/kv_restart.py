"""TTFT of a long session's next turn after a restart (KV from disk) against a warm turn and a full re-prefill.

The full in-process path (LocalClient: SQLite store, prompt building, the paged engine), twice over one data dir:
  run 1: each session is created with a `--history-tokens` history and turn 1 prefills it; closing the client
         writes every session's KV to the KV dir (as SIGTERM does).
  run 2: a new client (new engine, empty pools) on the same dir; per session, back to back: turn 2 loads its KV from
         disk (*restart*), turn 3 finds it on the device (*warm*), and a control session with the history turn 2
         saw, never run, takes turn 2's message (*re-prefill*). Interleaving the three keeps a busy machine's noise
         out of their ratios.
TTFT is the service's (`timing.ttft_ms`: engine submit -> first token), the same measure for all three; replies of
the restart and the control turn must be identical (greedy), or the KV from disk was not exact.

    python -m benchmarks.kv_restart --sessions 3 --history-tokens 2048 --out benchmarks/results/kv-restart.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.workload import WorkloadSpec, build_workload
from serving.client import LocalClient
from serving.config import Config, load_config
from serving.model_files import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--history-tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-dir", type=Path, default=None, help="store + KV dir; a fresh temp dir by default")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace, data_dir: Path) -> Config:
    return load_config(
        None,
        {
            "model": {"name": args.model, "device": args.device, "dtype": args.dtype},
            "sessions": {"store": f"sqlite:///{data_dir / 'sessions.db'}", "kv_dir": str(data_dir / "kv")},
        },
    )


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    config = config_for(args, data_dir)
    spec = WorkloadSpec(sessions=args.sessions, turns=3, history_tokens=args.history_tokens)
    workload = build_workload(load_tokenizer(args.model), spec)
    params = {"max_new_tokens": args.max_new_tokens}
    warm: list[float] = []
    restart: list[float] = []
    reprefill: list[float] = []
    cached: dict[str, list[int]] = {"warm": [], "restart_from_disk": [], "re_prefill": []}
    matches = 0

    client = LocalClient(config)
    for script in workload.sessions:
        client.create_session(script.session_id, system_prompt=workload.system_prompt, messages=script.history[1:])
        client.query(script.user_turns[0], session_id=script.session_id, **params)
    closing = time.perf_counter()
    client.close()  # writes every session's KV to the KV dir
    persist_s = time.perf_counter() - closing

    client = LocalClient(config)
    try:
        for script in workload.sessions:
            history = [m.model_dump() for m in client.history(script.session_id)]
            control = client.create_session(
                f"control-{script.session_id}", system_prompt=workload.system_prompt, messages=history
            )
            turn = client.query(script.user_turns[1], session_id=script.session_id, **params)
            warm_turn = client.query(script.user_turns[2], session_id=script.session_id, **params)
            recomputed = client.query(script.user_turns[1], session_id=control, **params)
            for name, reply, into in (
                ("restart_from_disk", turn, restart),
                ("warm", warm_turn, warm),
                ("re_prefill", recomputed, reprefill),
            ):
                into.append(reply.timing.ttft_ms)
                cached[name].append(reply.usage.cached_tokens)
            matches += turn.response == recomputed.response
    finally:
        client.close()
    kv_bytes = sum(path.stat().st_size for path in (data_dir / "kv").glob("*.safetensors"))
    return {
        "config": vars(args) | {"data_dir": str(data_dir), "out": str(args.out)},
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "ttft_ms": {"warm": median(warm), "restart_from_disk": median(restart), "re_prefill": median(reprefill)},
        "ttft_ms_all": {"warm": warm, "restart_from_disk": restart, "re_prefill": reprefill},
        "restart_over_warm": round(median(restart) / median(warm), 2),
        "re_prefill_over_warm": round(median(reprefill) / median(warm), 2),
        "cached_tokens": cached,
        "replies_match": f"{matches}/{len(workload.sessions)}",
        "persist_on_close_s": round(persist_s, 2),
        "kv_dir_bytes": kv_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kv-restart-") as tmp:
        result = run(args, args.data_dir or Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if result["replies_match"].split("/")[0] == result["replies_match"].split("/")[1] else 1


if __name__ == "__main__":
    raise SystemExit(main())
