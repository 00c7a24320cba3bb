"""Server configuration: pydantic at the edge (YAML, env), plain values inside."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from platformdirs import user_cache_dir, user_data_dir
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: int | str) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GiB or a number of bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def data_dir() -> Path:
    """Where durable state (the SQLite history) lives unless configured; SESSIONSERVE_DATA_DIR overrides."""
    return Path(os.environ.get("SESSIONSERVE_DATA_DIR") or user_data_dir("sessionserve"))


def cache_dir() -> Path:
    """Where converted models live; SESSIONSERVE_CACHE_DIR overrides."""
    return Path(os.environ.get("SESSIONSERVE_CACHE_DIR") or user_cache_dir("sessionserve"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    name: str = Field("builtin:smollm2-135m-instruct", description="builtin:NAME, a Hugging Face id or a local folder")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on cuda, fp32 on cpu), float32, bfloat16, float16")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads for torch; 0 = the process' CPUs shared among the model replicas on its node"
    )


class EngineConfig(_Section):
    kind: Literal["paged", "mii"] = Field(
        "paged", description="paged (this engine) or mii (DeepSpeed-MII FastGen, experimental: CUDA, extra [mii])"
    )
    max_batch_size: int = Field(32, ge=1, description="most sequences in one forward pass")
    max_batch_tokens: int = Field(2048, ge=16, description="most tokens (decode + prefill chunks) in one step")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_cache_memory: int = Field(2 * 2**30, description="device bytes for the KV pool")
    host_cache_memory: int = Field(4 * 2**30, description="host bytes for offloaded idle sessions' KV")
    disk_cache_memory: int = Field(
        16 * 2**30, description="disk bytes for idle sessions' KV past the host tier (in sessions.kv_dir); 0 = off"
    )
    max_model_len: int = Field(0, ge=0, description="context limit in tokens (prompt + reply); 0 = the model's")
    kv_grace_s: float = Field(
        2.0,
        ge=0,
        description="a pinned session's device KV is kept from other waiting turns this long after its turn ends "
        "(its next turn is likely on its way); 0 = no grace",
    )
    max_wait_s: float = Field(
        15.0,
        ge=0,
        description="turns of sessions whose KV is on the device are admitted first, until a waiting turn has "
        "waited this long: then it goes first (arrival order); 0 = plain arrival order",
    )
    inherit_warm_sessions: int = Field(
        8,
        ge=0,
        description="after a replica loss, each replica warms up to this many of the sessions it inherited (most "
        "recently active first), in the background while it has no turns to run; 0 = off",
    )

    @field_validator("kv_cache_memory", "host_cache_memory", "disk_cache_memory", mode="before")
    @classmethod
    def _sizes(cls, value: int | str) -> int:
        return parse_bytes(value)


class SessionsConfig(_Section):
    store: str = Field(
        "",
        description="sqlite:///PATH (one machine), postgresql://USER:PASS@HOST:PORT/DB or redis://HOST:PORT/N "
        "(several nodes), memory://; empty = sqlite in the data dir",
    )
    idle_ttl_s: float = Field(86400, gt=0, description="idle sessions expire after this many seconds")
    max_sessions: int = Field(10000, ge=1, description="live sessions at most")
    commit_timeout_s: float = Field(
        10, ge=0, description="how long a finished turn waits for an unreachable store before it fails uncommitted"
    )
    default_kv: Literal["pinned", "evictable", "none"] = Field(
        "pinned",
        description="KV policy of sessions created without one: pinned (kept), evictable (kept while the room is "
        "free) or none (history only, prefilled every turn)",
    )

    kv_dir: str = Field(
        "",
        description="where sessions' KV files go past the host tier and on shutdown (one per node, shared by its "
        "replicas); empty = kv/ in the data dir",
    )

    def store_url(self) -> str:
        return self.store or f"sqlite:///{data_dir() / 'sessions.db'}"

    def kv_path(self) -> Path:
        return Path(self.kv_dir) if self.kv_dir else data_dir() / "kv"


class ServingConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replicas: int = Field(1, ge=1)
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(
        1,
        gt=0,
        description="Ray CPUs reserved per model replica (scheduling only; model.torch_threads sets threads)",
    )
    replica_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each model replica needs, e.g. {sessionserve_model: 1} with every model "
        "node started with --resources '{\"sessionserve_model\": 1}': one replica per node",
    )
    api_keys: tuple[str, ...] = Field((), description="bearer tokens; empty = no auth")
    max_new_tokens: int = Field(4096, ge=1, description="largest max_new_tokens a request may ask for")
    max_prompt_tokens: int = Field(
        0, ge=0, description="prompt tokens per turn at most (older turns are trimmed); 0 = context"
    )
    request_timeout_s: float = Field(600, gt=0, description="an HTTP request still running after this is answered 408")
    shutdown_grace_s: float = Field(
        30, ge=0, description="on SIGTERM/SIGINT, how long running turns may finish before they are cancelled"
    )
    ingress: Literal["auto", "proxy", "direct", "replica", "haproxy"] = Field(
        "auto",
        description="auto: direct when `serve` starts its own Ray (proxy with several ingress_replicas), the "
        "cluster's own mode when it joins one; proxy: Ray Serve's HTTP proxy forwards to the ingress replica; "
        "direct: the ingress replica "
        "serves HTTP on `port` itself (RAY_SERVE_ENABLE_DIRECT_INGRESS), one process hop less per request; "
        "replica: the one model replica serves HTTP itself, no hop at all (replicas: 1); haproxy: HAProxy on `port` "
        "of each node forwards to the ingress replicas' own ports (RAY_SERVE_ENABLE_HA_PROXY)",
    )
    ingress_replicas: int = Field(
        1,
        ge=1,
        description="ingress replicas (CPU only: HTTP, auth, the session operations served from the store); more "
        "than one needs something to spread requests over them: haproxy or proxy",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="our log lines (one per turn, with its request id) as text with key=value fields or JSON"
    )
    access_log: bool = Field(
        True,
        description="Ray Serve's access log: a line per HTTP request and per call between deployments in each "
        "replica's log file; false drops them (at thousands of requests per second they cost the ingress ~4% of its "
        "CPU and fill the disk), our per-turn lines stay",
    )

    @model_validator(mode="after")
    def _one_replica_serves_http(self) -> ServingConfig:
        if self.ingress == "replica" and self.replicas != 1:
            raise ValueError(
                f"serving.ingress: replica makes the model replica serve HTTP itself, so there is one of it, not "
                f"{self.replicas}: set serving.replicas to 1, or use ingress direct, haproxy or proxy to route "
                f"sessions over several replicas"
            )
        if self.ingress_replicas > 1 and self.ingress in ("direct", "replica"):
            raise ValueError(
                f"serving.ingress: {self.ingress} gives one replica the configured port, so it serves HTTP alone, "
                f"not with {self.ingress_replicas} ingress replicas: set serving.ingress_replicas to 1, or use ingress "
                f"haproxy (HAProxy spreads requests over the ingress replicas' own ports) or proxy"
            )
        return self


class Config(_Section):
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    sessions: SessionsConfig = SessionsConfig()
    serving: ServingConfig = ServingConfig()

    def with_ingress(self, ingress: str) -> Config:
        """This configuration with `serving.ingress` resolved (from auto), validated again: the resolved mode may
        not allow what auto did (several ingress_replicas on a cluster started for direct ingress)."""
        serving = {**self.serving.model_dump(), "ingress": ingress}
        return Config.model_validate({**self.model_dump(), "serving": serving})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (every key optional) and apply dotted-free nested overrides on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return Config.model_validate(raw)
