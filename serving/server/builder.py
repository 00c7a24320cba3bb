"""build_app(config) -> serve.Application: the one place that wires ingress to model replicas.

`app_builder` is the YAML entry point: `import_path: serving.server.builder:app_builder`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ray import serve

from serving.config import Config, load_config
from serving.server import cluster
from serving.server.ingress import Ingress
from serving.server.llm_server import LLMServer
from serving.server.ring import SESSION_AFFINITY


def api_keys(config: Config) -> tuple[str, ...]:
    """Configured keys plus SESSIONSERVE_API_KEYS (comma separated), so secrets can stay out of YAML."""
    from_env = tuple(k.strip() for k in os.environ.get("SESSIONSERVE_API_KEYS", "").split(",") if k.strip())
    return tuple(config.serving.api_keys) + from_env


KV_PERSIST_TIMEOUT_S = 30.0
# How often a stopping replica checks that its requests are done (Ray's default: every 2 s, so each replica took at
# least 2 s to stop, one deployment after the other). Our drain has already let the turns finish or cancelled them.
SHUTDOWN_WAIT_LOOP_S = 0.25
SEPARATE_USER_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
ROUTER_OWN_LOOP = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"


def replicas_per_node(replicas: int) -> int:
    """Model replicas that will share a node's CPUs: spread evenly over the alive nodes Ray knows of."""
    import ray

    if not ray.is_initialized():
        return replicas
    nodes = sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)
    return math.ceil(replicas / max(1, nodes))


def check_store(config: Config) -> None:
    """Refuse a store the application's processes cannot share (also for `serve run` / KubeRay, not only the CLI)."""
    import ray

    store = config.sessions.store_url()
    if store == "memory://":
        raise ValueError(
            "sessions.store memory:// keeps sessions inside one process, but the ingress and the model replicas are "
            "separate processes: use sqlite:///PATH on one machine, postgresql:// or redis:// on several"
        )
    if ray.is_initialized():
        check = cluster.check_store(cluster.current_nodes(), store, starting=True)
        if check.level == "error":
            raise ValueError(check.message)


def build_app(config: Config) -> serve.Application:
    check_store(config)
    serving = config.serving
    settings = config.model_dump(mode="json")
    logging_config = {"enable_access_log": serving.access_log}  # every replica of both deployments
    # Ray runs a replica's code on a loop of its own thread by default, so each request, each handle call and each
    # streamed chunk crosses threads twice. Ours never blocks its loop (the engine and SQLite run in threads, a
    # network store's calls await its asyncio driver), so it shares Ray's: 10-20% less ingress CPU per session
    # operation (docs/control-plane-measurements.md, "Replicas on Ray's loop"), and with `ingress: replica` HTTP
    # overhead over in-process 2.6-3.9 ms vs 5.5-8.7 ms.
    on_rays_loop = {"env_vars": {SEPARATE_USER_THREAD: "0"}}
    # The ingress' handle routes its calls on that same loop too (its calls go over gRPC: Ingress.__init__).
    ingress_env = {"env_vars": {**on_rays_loop["env_vars"], ROUTER_OWN_LOOP: "0"}}
    model_replica: dict[str, Any] = {
        "logging_config": logging_config,
        # A stopping replica writes its sessions' KV to disk (LLMServer.__del__; the engine gives it 30 s).
        "graceful_shutdown_timeout_s": KV_PERSIST_TIMEOUT_S + 15,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S,
        "ray_actor_options": {
            "num_cpus": serving.cpus_per_replica,
            "num_gpus": serving.gpus_per_replica,
            "resources": dict(serving.replica_resources),
            "runtime_env": on_rays_loop,
        },
    }
    if serving.ingress == "replica":  # one deployment: the ingress holds the model, a turn makes no hop
        return Ingress.options(num_replicas=1, health_check_period_s=10, **model_replica).bind(
            None, settings, api_keys(config)
        )
    model = LLMServer.options(
        num_replicas=serving.replicas, request_router_config=SESSION_AFFINITY, **model_replica
    ).bind(settings, replicas_per_node(serving.replicas))
    ingress = Ingress.options(
        num_replicas=serving.ingress_replicas,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
        logging_config=logging_config,
        ray_actor_options={"num_cpus": 0, "runtime_env": ingress_env},  # HTTP and the store: no CPU reserved
    )
    return ingress.bind(model, settings, api_keys(config))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve config-file entry: args may hold `config` (a YAML path) and nested overrides."""
    path = args.get("config")
    overrides = {k: v for k, v in args.items() if k != "config" and isinstance(v, dict)}
    return build_app(load_config(Path(path) if path else None, overrides))
