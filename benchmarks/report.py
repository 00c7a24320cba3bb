"""Summaries (percentiles per system and per turn), machine facts, the JSON file and the TTFT-by-turn PNG."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.runner import RunResult, TurnRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(result: RunResult, turns: int) -> dict[str, Any]:
    """The contract fields (benchmarks/README.md) plus per-turn detail and token accounting."""
    records = result.records
    ttft = [r.ttft_ms for r in records]
    tpot = [r.tpot_ms for r in records if r.tpot_ms is not None]
    by_turn: list[list[TurnRecord]] = [[r for r in records if r.turn == t] for t in range(turns)]
    completion = sum(r.completion_tokens for r in records)
    reported = [r.cached_tokens for r in records if r.cached_tokens is not None]
    prompt_total = sum(r.prompt_tokens for r in records)
    return {
        "ttft_ms": {"p50": _r(percentile(ttft, 50)), "p90": _r(percentile(ttft, 90)), "p99": _r(percentile(ttft, 99))},
        "ttft_ms_by_turn": [_r(percentile([r.ttft_ms for r in rs], 50)) for rs in by_turn],
        "ttft_ms_p90_by_turn": [_r(percentile([r.ttft_ms for r in rs], 90)) for rs in by_turn],
        "tpot_ms": {"p50": _r(percentile(tpot, 50)), "p90": _r(percentile(tpot, 90)), "p99": _r(percentile(tpot, 99))},
        "e2e_ms": {"p50": _r(percentile([r.e2e_ms for r in records], 50))},
        "throughput_tok_s": _r(completion / result.wall_s if result.wall_s > 0 else 0.0),
        "wall_s": _r(result.wall_s, 3),
        "requests": len(records),
        "prompt_tokens": prompt_total,
        "prompt_tokens_by_turn": [
            _r(statistics.fmean(r.prompt_tokens for r in rs), 1) if rs else None for rs in by_turn
        ],
        "completion_tokens": completion,
        "completion_tokens_by_turn": [sum(r.completion_tokens for r in rs) for rs in by_turn],
        "cached_tokens": sum(reported) if reported else None,
        "cached_tokens_by_turn": [
            sum(r.cached_tokens or 0 for r in rs) if any(r.cached_tokens is not None for r in rs) else None
            for rs in by_turn
        ],
        "cached_fraction": _r(sum(reported) / prompt_total, 4) if reported and prompt_total else None,
        **phases(records),
    }


def phases(records: Sequence[TurnRecord]) -> dict[str, Any]:
    """For systems that report where a turn went: p50 per phase, and the share of a turn outside the forward
    pass at p50, of the client's end-to-end time and of the service's own total."""
    timed = [r for r in records if r.phases_ms]
    if not timed:
        return {}
    names = list(timed[0].phases_ms or {})
    outside_e2e = [1 - (r.phases_ms or {})["forward"] / r.e2e_ms for r in timed if r.e2e_ms > 0]
    outside_turn = [1 - p["forward"] / p["total"] for r in timed if (p := r.phases_ms or {})["total"] > 0]
    return {
        "phases_ms_p50": {name: _r(percentile([(r.phases_ms or {})[name] for r in timed], 50), 3) for name in names},
        "outside_forward_fraction_p50": {
            "of_client_e2e": _r(percentile(outside_e2e, 50), 4),
            "of_service_turn": _r(percentile(outside_turn, 50), 4),
        },
        "phases_ms_by_request": [
            {"session_id": r.session_id, "turn": r.turn, "e2e_ms": _r(r.e2e_ms, 3), **(r.phases_ms or {})}
            for r in timed
        ],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot_ttft_by_turn(path: Path, document: dict[str, Any]) -> None:
    """One line per system: p50 TTFT (ms) against the turn index; log scale when the spread is large."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    values: list[float] = []
    for name, result in document["systems"].items():
        series = result.get("ttft_ms_by_turn") or []
        points = [(turn, v) for turn, v in enumerate(series) if v is not None]
        if points:
            axes.plot([t for t, _ in points], [v for _, v in points], marker="o", label=name)
            values += [v for _, v in points]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axes.set_yscale("log")
    config = document["config"]
    in_flight = config.get("in_flight") or config["concurrency"]
    budget = config.get("kv_cache_memory") or "default"
    axes.set_title(
        f"TTFT by turn (p50 over {config['sessions']} sessions, {config['concurrency']} live, "
        f"{in_flight} in flight, KV budget {budget})\n"
        f"{config['model']}, history {config['history_tokens']} tokens, {config['max_new_tokens']} new tokens/turn"
    )
    axes.set_xlabel("turn (0 = first request: whole initial history is new)")
    axes.set_ylabel("time to first token, ms")
    axes.set_xticks(range(config["turns"]))
    axes.grid(True, which="both", alpha=0.3)
    if values:
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
