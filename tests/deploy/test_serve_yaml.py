"""deploy/serve.yaml starts the app with `serve run`, on a Ray instance of its own, and answers a turn over HTTP.

The file is run as shipped except for what a CPU-only machine needs: `args.config` points to a tiny CPU config and
the HTTP proxy listens on a free loopback port. `RAY_ADDRESS=local` makes `serve run` start a fresh Ray instance
(never the test suite's cluster, nor anyone else's on this machine) and `RAY_TMPDIR` gives it its own temp dir.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.paths import REPO
from tests.servers import free_port

pytestmark = pytest.mark.ray

SERVE_YAML = REPO / "deploy" / "serve.yaml"
SERVE_BIN = Path(sys.executable).with_name("serve")
START_TIMEOUT_S = 75


def cpu_config(tmp: Path) -> Path:
    """A sessionserve config for this machine: the builtin tiny model, fp32 on the CPU, SQLite in tmp."""
    config = {
        "model": {"name": "builtin:tiny-random-llama", "device": "cpu", "dtype": "float32", "torch_threads": 1},
        "engine": {"max_batch_tokens": 256, "kv_cache_memory": "8MiB", "host_cache_memory": "8MiB"},
        "sessions": {"store": f"sqlite:///{tmp / 'sessions.db'}"},
        "serving": {"cpus_per_replica": 1},
    }
    path = tmp / "cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def derived_serve_yaml(tmp: Path, port: int) -> Path:
    """deploy/serve.yaml with the CPU config and a free loopback port; everything else as shipped."""
    shipped: dict[str, Any] = yaml.safe_load(SERVE_YAML.read_text())
    derived = copy.deepcopy(shipped)
    derived["http_options"].update(host="127.0.0.1", port=port)
    derived["applications"][0]["args"]["config"] = str(cpu_config(tmp))
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(derived))
    return path


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`serve run` exited with {proc.returncode} before /ready:\n{log.read_text()[-4000:]}")
        if "failed with exception" in (text := log.read_text()):  # Serve's controller gave up on the app
            pytest.fail(f"the application failed to deploy:\n{text[-4000:]}")
        try:
            response = httpx.get(f"{url}/ready", timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.5)
    pytest.fail(f"/ready not 200 after {START_TIMEOUT_S} s (last: {last}):\n{log.read_text()[-4000:]}")


@pytest.fixture
def work_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: Ray's socket paths under it would pass the 107-byte AF_UNIX limit, and on a machine
    # shared with other pytest runs their base-temp cleanup may remove it while `serve run` still reads from it.
    path = Path(tempfile.mkdtemp(prefix="ssr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _like_a_terminal() -> None:
    """In the child: SIGINT as in a shell's foreground job (a background parent may have left it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_run_deploy_yaml_serves_a_turn(tokenizer_dir, work_dir: Path) -> None:
    assert SERVE_BIN.exists(), f"Ray Serve's CLI is missing at {SERVE_BIN}: pip install 'ray[serve]==2.60.0'"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",  # a new Ray instance, whatever else runs on this machine
        "RAY_TMPDIR": str(work_dir / "ray"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),  # replicas import this tree
        "SESSIONSERVE_DATA_DIR": str(work_dir / "data"),
    }
    log = work_dir / "serve-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SERVE_BIN), "run", str(derived_serve_yaml(work_dir, port))],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C-like SIGINT, and nothing of ours left behind
            preexec_fn=_like_a_terminal,
        )
    try:
        wait_ready(url, proc, log)
        with httpx.Client(base_url=url, timeout=30) as http:
            created = http.post("/v1/sessions", json={"system_prompt": "You are terse."})
            assert created.status_code == 201, created.text
            sid = created.json()["session_id"]
            turn = http.post(f"/v1/sessions/{sid}/query", json={"prompt": "Hello?", "max_new_tokens": 4})
            assert turn.status_code == 200, turn.text
            body = turn.json()
            assert body["session_id"] == sid
            assert body["usage"]["completion_tokens"] >= 1
            assert len(http.get(f"/v1/sessions/{sid}/messages").json()["messages"]) == 2
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`serve run` still running 45 s after SIGINT:\n{log.read_text()[-4000:]}")
        assert not port_open(port), f"port {port} still open after `serve run` exited"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # Ray processes it left in its group: only ours, by group id
            os.killpg(proc.pid, signal.SIGKILL)
