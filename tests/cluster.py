"""A real two-node Ray cluster on this machine, for tests of node loss and of `sessionserve serve --address`.

Each node is a `ray start --block` process in its own session (process group), with its own ports and temp dir,
so a test can kill one node outright (its raylet and every worker on it) while the other keeps serving, and the
cluster never attaches to another test's Ray. Nothing here calls `ray.init` in the test process: what needs a Ray
driver runs as `python -m tests.cluster <command>` in a subprocess (the rest of the suite holds an in-process
`ray.init` session fixture, and one process can be the driver of one cluster only).

    python -m tests.cluster nodes [N]                  # wait for N (2) alive nodes, print them
    python -m tests.cluster deploy CONFIG.json PORT    # serve.run(build_app(config)) with the proxy on the head
    python -m tests.cluster placement APP              # {replica unique id: "head" | "worker"} of APP's model
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.paths import REPO

RAY = str(Path(sys.executable).with_name("ray"))
RESULT = "tests.cluster result: "
HEAD_RESOURCES = {"node_head": 1, "sessionserve_model": 1}
WORKER_RESOURCES = {"node_worker": 1, "sessionserve_model": 1}
# The GCS declares a node dead after period x threshold without an answer (Ray's defaults: 3 s x 5 + timeouts).
FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all bound at once, so the kernel cannot hand the same one out twice (one
    `free_port()` after another can, and Ray refuses to start a node whose components share a port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)


def node_ports(worker_base: int, ports: list[int]) -> list[str]:
    """Every port a node listens on, explicit (`ports`: distinct free ones, one per NODE_PORT_FLAGS entry): two
    nodes (or two clusters) on one machine never share one."""
    return [f"{flag}={port}" for flag, port in zip(NODE_PORT_FLAGS, ports, strict=True)] + [
        f"--min-worker-port={worker_base}",
        f"--max-worker-port={worker_base + 199}",
    ]


@dataclass
class RayNode:
    """One `ray start --block` and everything it spawned; its session id is its process group."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    known: set[int] = field(default_factory=set)

    def remember_processes(self) -> set[int]:
        """The pids of the node's processes: its group, plus descendants (a worker may leave the group)."""
        pids = {self.process.pid}
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if os.getpgid(proc.pid) == self.process.pid:
                    pids.add(proc.pid)
        with contextlib.suppress(psutil.Error):
            pids |= {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}
        self.known |= pids
        return pids

    def kill(self, timeout: float = 20) -> None:
        """SIGKILL the whole node at once (what a machine loss looks like to the rest of the cluster)."""
        pids = self.remember_processes() | self.known
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=timeout)
        gone_by = time.monotonic() + timeout
        while time.monotonic() < gone_by:
            alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
            if not alive:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} node processes still alive after SIGKILL: {alive}")


def start_node(name: str, args: list[str], temp_dir: Path, env: dict[str, str]) -> RayNode:
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = temp_dir.parent / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=REPO,
        )
    return RayNode(name, process, temp_dir, log)


@dataclass
class TwoNodeCluster:
    address: str
    head: RayNode
    env: dict[str, str]
    worker_args: list[str]
    worker_dir: Path
    worker: RayNode | None = None

    def join_worker(self) -> RayNode:
        """Start the worker node and wait until the cluster counts two alive nodes."""
        self.worker = start_node("worker", self.worker_args, self.worker_dir, self.env)
        self.driver("nodes", "2", timeout=90)
        return self.worker

    def kill_worker(self) -> None:
        assert self.worker is not None, "no worker node joined"
        self.worker.kill()

    def driver(self, *args: str, timeout: float = 240) -> str:
        """Run `python -m tests.cluster ARGS` connected to this cluster (it must exit 0); what it printed as its
        result (Ray pushes cluster events such as a node's death to a driver's stdout too)."""
        result = subprocess.run(
            [sys.executable, "-m", "tests.cluster", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=self.env,
        )
        if result.returncode != 0:
            died = [node for node in (self.head, self.worker) if node is not None and node.process.poll() is not None]
            logs = "".join(f"\n{node.name} node exited; its log:\n{node.log.read_text()[-3000:]}" for node in died)
            raise RuntimeError(
                f"driver {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}{logs}"
            )
        return "".join(line.removeprefix(RESULT) for line in result.stdout.splitlines(True) if line.startswith(RESULT))

    def logs(self) -> str:
        nodes = [n for n in (self.head, self.worker) if n is not None]
        return "\n".join(f"--- {n.name}\n{n.log.read_text()[-3000:]}" for n in nodes)


def cluster_env(address: str) -> dict[str, str]:
    """For every process of the cluster and its drivers. Token auth off explicitly: Ray 2.60 turns it on for a new
    head whenever ~/.ray/auth_token exists (any local `ray.init` writes one), but not for a node or driver that
    joins with an explicit address, which then cannot connect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | FAST_NODE_DEATH | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


# What a node logs when its raylet has not registered with the GCS within the 30 s Ray allows (fixed, in
# ray/_private/node.py): a busy 2-core machine can miss it (seen with the suite's Ray part run on two workers).
NODE_START_TIMED_OUT = "timed out during startup"


@contextlib.contextmanager
def two_node_cluster(
    cpus_per_node: int = 1,
    object_store_bytes: int = 200 * 2**20,
    join_worker: bool = True,
    node_env: Mapping[str, str] | None = None,
) -> Iterator[TwoNodeCluster]:
    """Head + worker on 127.0.0.1, each with `sessionserve_model: 1`; both killed (by process group) on exit.
    With join_worker=False only the head starts; `cluster.join_worker()` adds the worker later. `node_env` is added
    to the environment the nodes start with (Ray reads some settings only there). A start that failed because a
    node timed out (NODE_START_TIMED_OUT) is tried once more, on fresh ports; nothing the tests check is retried."""
    for attempt in (1, 2):
        starting = _started_cluster(cpus_per_node, object_store_bytes, join_worker, node_env)
        with contextlib.ExitStack() as stack:
            try:
                cluster = stack.enter_context(starting)
            except RuntimeError as error:
                if attempt == 2 or NODE_START_TIMED_OUT not in str(error):
                    raise
                continue
            yield cluster
            return


@contextlib.contextmanager
def _started_cluster(
    cpus_per_node: int, object_store_bytes: int, join_worker: bool, node_env: Mapping[str, str] | None
) -> Iterator[TwoNodeCluster]:
    root = Path(tempfile.mkdtemp(prefix="ss2n-", dir="/tmp"))  # short: Ray's socket paths live under it
    nodes = len(NODE_PORT_FLAGS)
    gcs_port, client_port, *ports = free_ports(2 + 2 * nodes)  # every port of both nodes distinct
    address = f"127.0.0.1:{gcs_port}"
    env = cluster_env(address) | dict(node_env or {})
    # Below Linux's ephemeral range (32768+, where free_port() draws) and above ray.init's default (10002-19999).
    worker_base = random.Random().randrange(20000, 32000, 400)
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus_per_node}",
        f"--object-store-memory={object_store_bytes}",
    ]
    head = start_node(
        "head",
        [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={client_port}",
            f"--resources={json.dumps(HEAD_RESOURCES)}",
            *common,
            *node_ports(worker_base, ports[:nodes]),
        ],
        root / "h",
        env,
    )
    cluster = TwoNodeCluster(
        address,
        head,
        env,
        [
            f"--address={address}",
            f"--resources={json.dumps(WORKER_RESOURCES)}",
            *common,
            *node_ports(worker_base + 200, ports[nodes:]),
        ],
        root / "w",
    )
    try:
        deadline = time.monotonic() + 60
        while not port_open(gcs_port):
            if head.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start:\n{head.log.read_text()}")
            time.sleep(0.2)
        if join_worker:
            cluster.join_worker()
        else:
            cluster.driver("nodes", "1", timeout=90)
        yield cluster
    finally:
        for node in (cluster.worker, head):
            if node is not None and node.process.poll() is None:
                node.kill()
        shutil.rmtree(root, ignore_errors=True)


# ---- driver commands (run in a subprocess by TwoNodeCluster.driver) --------------------------------------------------
def _connect() -> None:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)


def _nodes(expected: str = "2", timeout: float = 60) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while len(alive := [n for n in ray.nodes() if n["Alive"]]) != int(expected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(alive)} of {expected} nodes alive")
        time.sleep(0.5)
    print(RESULT + json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in alive]))


def _deploy(config_path: str, port: str, name: str = "sessionserve") -> None:
    from ray import serve

    from serving.config import Config
    from serving.server.builder import build_app

    config = Config.model_validate_json(Path(config_path).read_text())
    serve.start(http_options={"host": "127.0.0.1", "port": int(port)}, proxy_location="HeadOnly")
    serve.run(build_app(config), name=name, route_prefix="/")


def _placement(app: str) -> None:
    """Each ALIVE model replica of `app` and the node it runs on, named by that node's custom resource."""
    import ray
    from ray._private.state import actors

    role = {}
    for node in ray.nodes():
        if node["Alive"]:
            role[node["NodeID"]] = "head" if "node_head" in node["Resources"] else "worker"
    from tests.support import replica_actor_name

    prefix = replica_actor_name(app, "")
    placed = {
        info["Name"].removeprefix(prefix): role.get(info["Address"]["NodeID"], "dead")
        for info in actors().values()
        if info["Name"].startswith(prefix) and info["State"] == "ALIVE"
    }
    print(RESULT + json.dumps(placed))


def main(argv: list[str]) -> None:
    commands = {"nodes": _nodes, "deploy": _deploy, "placement": _placement}
    command, *args = argv
    _connect()
    commands[command](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
