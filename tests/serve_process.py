"""A real `sessionserve serve` subprocess for lifecycle tests: its own Ray (own temp dir), its own port, a temp YAML.

Signals go to the serve process alone, as `docker stop` or Kubernetes send them (to the container's main process);
cleanup kills the whole tree (Ray's processes included) whatever state the test left it in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.cluster import free_port, port_open
from tests.paths import REPO
from tests.support import TINY


def tiny_config(store: str, grace_s: float, **serving: Any) -> dict[str, Any]:
    """A serve YAML (as a dict) for the 2-layer random model: fast to load, ~400 tokens/s on this machine."""
    return {
        "model": {"name": TINY, "device": "cpu", "dtype": "float32", "torch_threads": 1},
        "engine": {"kv_cache_memory": "64MiB", "host_cache_memory": "64MiB", "max_model_len": 2048},
        "sessions": {"store": store},
        "serving": {"cpus_per_replica": 0.5, "shutdown_grace_s": grace_s, **serving},
    }


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (Ray's workers start their own sessions)."""
    with contextlib.suppress(psutil.Error):
        victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class ServeProcess:
    process: subprocess.Popen
    port: int
    ray_tmp: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, config: dict[str, Any], workdir: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> ServeProcess:
        """`args` go after `serve --config FILE`; `env` is added to ours (from which every RAY_* is dropped)."""
        port = free_port()
        config = {**config, "serving": {**config.get("serving", {}), "host": "127.0.0.1", "port": port}}
        path = workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        ray_tmp = Path(tempfile.mkdtemp(prefix="sslc-", dir="/tmp"))  # short: Ray's socket paths live under it
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        environment |= {"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO), "SESSIONSERVE_DATA_DIR": str(workdir)}
        environment |= env or {}
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--config", str(path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=environment,
            start_new_session=True,
        )
        running = cls(process, port, ray_tmp)
        threading.Thread(target=running._read, daemon=True).start()
        return running

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line with {text!r} (exit {self.process.poll()}):\n{self.output()[-5000:]}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until serve prints its ready line: the whole prefix, since Ray's own logs say "not ready on node ..."
        when a proxy's health check is slow."""
        self.wait_for_line("sessionserve ready on", timeout)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"serve still running {timeout} s after the signal:\n{self.output()[-5000:]}"
            ) from error

    def port_open(self) -> bool:
        return port_open(self.port)

    def own_processes(self) -> list[psutil.Process]:
        """The live processes of this serve and of the Ray it started (GCS, raylet, agents, replicas): its process
        group and its descendants, never another Ray on the machine (the suite runs a shared cluster beside it)."""
        pids: set[int] = set()
        with contextlib.suppress(psutil.Error):
            pids |= {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}
        found = []
        for proc in psutil.process_iter(["pid", "name", "status", "cmdline", "nice"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                ours = proc.pid in pids or os.getpgid(proc.pid) == self.process.pid
                if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def leftovers(self) -> list[str]:
        """Processes of this serve's Ray still alive once serve has exited."""
        return [f"{proc.pid} {proc.info['name']}" for proc in self.own_processes()]

    def close(self) -> None:
        if self.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of Ray it left behind
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
