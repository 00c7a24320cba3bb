"""TTFT of a session's next turn after its replica was lost: warmed in the background by its new owner, against cold.

The real Ray Serve app (`build_app`: ingress + 2 model replicas, SQLite, consistent-hash routing) on a local Ray.
`--sessions` sessions are created with a `--history-tokens` history and take one turn, so their KV sits on their
replica. The replica holding most of them is killed (`ray.kill`: a crash, no KV written). Once Serve has replaced it
and each lost session's new owner (by the router's ring) has logged its warm-up, per lost session, back to back: a
*cold* twin (the same history, `kv: none`) takes the next message, then the *inherited* session takes it. TTFT is
the service's (`timing.ttft_ms`: engine submit -> first token) for both; their replies must be identical (greedy).

    python -m benchmarks.inherit_warmup --sessions 8 --history-tokens 1024 --out benchmarks/results/inherit-warmup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.workload import WorkloadSpec, build_workload
from serving.config import Config, load_config
from serving.model_files import load_tokenizer

APP = "bench-inherit"
REPLICA_HEADER = "x-sessionserve-replica"
WARMED = " inherited session warmed "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--history-tokens", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--timeout-s", type=float, default=600, help="for the replacement and the warm-ups")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace, data_dir: Path) -> Config:
    return load_config(
        None,
        {
            "model": {"name": args.model, "device": "cpu", "dtype": "float32", "torch_threads": 1},
            "engine": {"kv_cache_memory": "512MiB", "host_cache_memory": "512MiB", "inherit_warm_sessions": 8},
            "sessions": {"store": f"sqlite:///{data_dir / 'sessions.db'}", "kv_dir": str(data_dir / "kv")},
            "serving": {"replicas": 2, "cpus_per_replica": 0.5},
        },
    )


def wait_for_warmups(owners: dict[str, str], logs: Path, timeout_s: float) -> dict[str, dict[str, str]]:
    """Each session's warm-up line by its owner, from the replicas' logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[str, dict[str, str]] = {}
        for path in logs.rglob("*"):
            if path.suffix not in (".err", ".out", ".log") or not path.is_file():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if WARMED in line:
                    fields = dict(pair.split("=", 1) for pair in line.split(WARMED, 1)[1].split())
                    if owners.get(fields["session_id"]) == fields["replica"]:
                        found[fields["session_id"]] = fields
        if len(found) == len(owners) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.serve._private.common import DeploymentID

    from serving.server import cluster
    from serving.server.builder import build_app
    from serving.server.ring import SessionRing, running_replicas

    workload = build_workload(
        load_tokenizer(args.model), WorkloadSpec(sessions=args.sessions, turns=2, history_tokens=args.history_tokens)
    )
    cluster.connect(None)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config_for(args, data_dir)), name=APP, route_prefix=f"/{APP}")
    deployment = DeploymentID(name="LLMServer", app_name=APP)
    params = {"max_new_tokens": args.max_new_tokens}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/{APP}", timeout=args.timeout_s) as http:
        replica_of = {}
        for script in workload.sessions:
            body = {"session_id": script.session_id, "system_prompt": workload.system_prompt}
            http.post("/v1/sessions", json=body | {"messages": script.history[1:]}).raise_for_status()
            first = {"prompt": script.user_turns[0], **params}
            reply = http.post(f"/v1/sessions/{script.session_id}/query", json=first)
            replica_of[script.session_id] = reply.raise_for_status().headers[REPLICA_HEADER]
        victim = max(set(replica_of.values()), key=[*replica_of.values()].count)
        lost = [s for s in workload.sessions if replica_of[s.session_id] == victim]

        killed_at = time.monotonic()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LLMServer#{victim}", namespace="serve"), no_restart=True)
        while len(running := running_replicas(deployment)) != 2 or victim in running:
            assert time.monotonic() - killed_at < args.timeout_s, "no replacement replica"
            time.sleep(0.5)
        replaced_s = time.monotonic() - killed_at
        ring = SessionRing(running, deployment)
        owners = {s.session_id: ring.owner(s.session_id) or "" for s in lost}
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        warmed = wait_for_warmups(owners, logs, args.timeout_s)
        warmed_s = time.monotonic() - killed_at

        cold_ttft, warm_ttft, cached, matches = [], [], [], 0
        for script in lost:
            sid = script.session_id
            history = http.get(f"/v1/sessions/{sid}/messages").json()["messages"]
            body = {"session_id": f"cold-{sid}", "system_prompt": workload.system_prompt, "messages": history}
            http.post("/v1/sessions", json=body | {"kv": "none"}).raise_for_status()
            turn = {"prompt": script.user_turns[1], **params}
            cold = http.post(f"/v1/sessions/cold-{sid}/query", json=turn).raise_for_status().json()
            inherited = http.post(f"/v1/sessions/{sid}/query", json=turn).raise_for_status().json()
            cold_ttft.append(cold["timing"]["ttft_ms"])
            warm_ttft.append(inherited["timing"]["ttft_ms"])
            cached.append(inherited["usage"]["cached_tokens"])
            matches += cold["response"] == inherited["response"]
    serve.delete(APP)
    return {
        "config": vars(args) | {"out": str(args.out)},
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "lost_sessions": len(lost),
        "warmed_before_their_turn": len(warmed),
        "warmup_sources": sorted({fields["source"] for fields in warmed.values()}),
        "replacement_running_s": round(replaced_s, 1),
        "all_warmed_s": round(warmed_s, 1),
        "ttft_ms": {"inherited_warmed": _median(warm_ttft), "cold": _median(cold_ttft)},
        "ttft_ms_all": {"inherited_warmed": warm_ttft, "cold": cold_ttft},
        "cold_over_warmed": round(_median(cold_ttft) / _median(warm_ttft), 1),
        "cached_tokens": cached,
        "replies_match": f"{matches}/{len(lost)}",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inherit-warmup-") as tmp:
        result = run(args, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    matched, total = result["replies_match"].split("/")
    return 0 if matched == total and result["warmed_before_their_turn"] == result["lost_sessions"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
