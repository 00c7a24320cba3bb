"""Helpers shared by test modules (fixtures live in conftest.py files)."""

from __future__ import annotations

import time

import httpx

from serving.config import Config, load_config

APP_NAME = "sessionserve-test"


def smollm2_config(store: str, **engine: object) -> Config:
    return load_config(
        None,
        {
            "engine": {"kv_cache_memory": "512MiB", "host_cache_memory": "512MiB", "max_model_len": 1024, **engine},
            "sessions": {"store": store},
            # Ray reserves, torch uses: a half-CPU reservation lets a second app fit on the 2-CPU test cluster.
            "serving": {"cpus_per_replica": 0.5},
            "model": {"device": "cpu", "dtype": "float32", "torch_threads": 2},
        },
    )


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
