"""Helpers shared by test modules (fixtures live in conftest.py files)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx

from serving.config import Config, load_config
from tests.paths import REPO

APP_NAME = "sessionserve-test"


def imported_with(modules: Iterable[str], packages: Iterable[str]) -> list[str]:
    """The modules of `packages` that importing `modules` brings in, in a fresh interpreter (this process has
    imported everything already)."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(packages)!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    found: list[str] = json.loads(result.stdout)
    return found


def smollm2_config(store: str, **engine: object) -> Config:
    """A SQLite store's KV files go beside it, so tests never find each other's KV (same ids, same prompts)."""
    kv_dir = str(Path(store.removeprefix("sqlite:///")).parent / "kv") if store.startswith("sqlite:///") else ""
    return load_config(
        None,
        {
            "engine": {"kv_cache_memory": "512MiB", "host_cache_memory": "512MiB", "max_model_len": 1024, **engine},
            "sessions": {"store": store, "kv_dir": kv_dir},
            # Ray reserves, torch uses: a half-CPU reservation lets a second app fit on the 2-CPU test cluster.
            "serving": {"cpus_per_replica": 0.5},
            "model": {"device": "cpu", "dtype": "float32", "torch_threads": 2},
        },
    )


def generate_reference(loaded: object, ids: list[int], n: int, **options: object) -> list[int]:
    """What plain transformers `generate` (greedy) answers after `ids`: the engine's exactness reference."""
    import torch

    device = loaded.device  # type: ignore[attr-defined]
    with torch.inference_mode():
        out = loaded.model.generate(  # type: ignore[attr-defined]
            torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=n,
            do_sample=False,
            **options,
        )
    return out[0, len(ids) :].tolist()


# |best logit - logit of the engine's token| <= this, per step, in bf16: 8 mantissa bits (~0.4% of a logit of
# magnitude up to ~8 here, through 30 layers whose kernels round differently), so tokens may differ at near ties
BF16_LOGIT_TOLERANCE = 0.15


def logit_gap(loaded: object, prompt: list[int], tokens: list[int]) -> float:
    """How far below the best logit the worst of `tokens` scores, under the dense model's own logits for the
    sequence (0: every token was the argmax): the bf16 tests' measure of an engine's greedy choices."""
    import torch

    model = loaded.model  # type: ignore[attr-defined]
    sequence = torch.tensor([[*prompt, *tokens]], device=model.device)
    with torch.inference_mode():
        logits = model(sequence).logits[0, len(prompt) - 1 : -1].float()  # the step before each token
    chosen = logits.gather(1, torch.tensor(tokens, device=model.device)[:, None])[:, 0]
    return float((logits.max(1).values - chosen).max())


def wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy")


def deploy(config: Config, port: int, name: str = APP_NAME, route_prefix: str = "/") -> str:
    from ray import serve

    from serving.server.builder import build_app

    serve.run(build_app(config), name=name, route_prefix=route_prefix)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_healthy(url)
    return url


# ---- helpers for the multi-app server suites (replicas, auth, load, fuzz) --------------------------------------------
REPLICA_HEADER = "x-sessionserve-replica"
TINY = "builtin:tiny-random-llama"


def app_config(
    store: str,
    *,
    model: str | None = None,
    replicas: int = 1,
    torch_threads: int = 2,
    api_keys: tuple[str, ...] = (),
    serving: dict[str, object] | None = None,
    **engine: object,
) -> Config:
    """smollm2_config with the knobs the multi-app suites turn: model, replicas, threads, keys, serving, engine."""
    base = smollm2_config(store, **engine)
    model_section = {"torch_threads": torch_threads, **({"name": model} if model else {})}
    serving_section = {"replicas": replicas, "api_keys": tuple(api_keys), **(serving or {})}
    return base.model_copy(
        update={
            "model": base.model.model_copy(update=model_section),
            "serving": base.serving.model_copy(update=serving_section),
        }
    )


@contextlib.contextmanager
def serve_app(config: Config, port: int, name: str, route_prefix: str) -> Iterator[str]:
    """Deploy an extra app under its own name and prefix on the session's cluster; always delete it afterwards."""
    from ray import serve

    try:
        yield deploy(config, port, name, route_prefix)
    finally:
        serve.delete(name)


def replica_actor_name(app_name: str, replica_id: str, deployment: str = "LLMServer") -> str:
    """The Ray actor name of a Serve replica (ReplicaID.to_full_id_str), in the 'serve' namespace."""
    return f"SERVE_REPLICA::{app_name}#{deployment}#{replica_id}"


def kill_replica(app_name: str, replica_id: str, timeout: float = 30) -> None:
    """Kill the replica actor behind `x-sessionserve-replica: replica_id` and wait until Ray reports it gone."""
    import ray

    name = replica_actor_name(app_name, replica_id)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace="serve")
        except ValueError:
            return
        time.sleep(0.2)
    raise TimeoutError(f"replica actor {name} still registered {timeout}s after ray.kill")


def logs_dir() -> Path:
    """Where this test session's Ray cluster (not another) writes its processes' logs."""
    import ray._private.worker

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def assert_error_envelope(response: httpx.Response, status: int) -> dict:
    """The response has `status` and the `{"error": {"code", "message"}}` body with a non-empty message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"], body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    return body["error"]
