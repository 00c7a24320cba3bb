"""Real PostgreSQL and Redis servers on loopback for tests and benchmarks: own temp dir, free port, no persistence.

`start_postgres()` / `start_redis()` return a handle with `.url`, `.stop()`, `.start()` (same port and data, so a
test can take the server away and bring it back) and `.close()`. Missing binaries raise MissingServer, whose message
says how to install them: fixtures turn it into a failure, never a skip, so CI cannot silently lose the suite.
PostgreSQL refuses to run as root, so under root it runs as `nobody` (via runuser) in a temp dir chowned to it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install them with `bash scripts/install-system-deps.sh` (apt: redis-server, postgresql-15)"


class MissingServer(RuntimeError):
    """A server binary is not installed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]), reverse=True)
    if versions:
        return str(versions[0])
    raise MissingServer(f"PostgreSQL's `{name}` was not found on PATH nor in /usr/lib/postgresql/*/bin: {INSTALL_HINT}")


def _wait_port(port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing is listening on 127.0.0.1:{port} after {deadline_s} s")


@dataclass
class PostgresServer:
    root: Path
    port: int
    password: str
    run_as: str | None  # the unprivileged user when started by root
    durable: bool = False
    user: str = "sessionserve"
    database: str = "postgres"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> None:
        speed = "" if self.durable else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200{speed}"
        log = str(self.root / "postgres.log")
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):  # Debian's postgresql package creates `postgres`; `nobody` is everywhere
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise MissingServer("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """initdb + pg_ctl start on a free port; password auth over TCP. durable=False turns fsync off (tests)."""
    initdb = postgres_bin("initdb")
    postgres_bin("pg_ctl")
    postgres_bin("postgres")
    run_as = _unprivileged_user()
    root = Path(tempfile.mkdtemp(prefix="sessionserve-pg-", dir="/tmp" if run_as else None))
    server = PostgresServer(root, free_port(), secrets.token_hex(12), run_as, durable)
    try:
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if run_as:
            entry = pwd.getpwnam(run_as)
            for path in (root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        server._run(
            initdb, "-D", str(server.data), "-U", server.user, f"--pwfile={pwfile}", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@dataclass
class RedisServer:
    root: Path
    port: int
    password: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen([_redis_bin(), str(self.root / "redis.conf")], stdout=log, stderr=log)
        _wait_port(self.port, 20)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _redis_bin() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise MissingServer(f"`redis-server` was not found on PATH: {INSTALL_HINT}")
    return found


def start_redis(*, durable: bool = False) -> RedisServer:
    """redis-server with a generated config: loopback only, a password; no persistence unless durable (then an
    append-only file synced on every write, so a stopped and restarted server keeps its data)."""
    _redis_bin()
    root = Path(tempfile.mkdtemp(prefix="sessionserve-redis-"))
    server = RedisServer(root, free_port(), secrets.token_hex(12))
    persistence = "appendonly yes\nappendfsync always\n" if durable else "appendonly no\n"
    (root / "redis.conf").write_text(
        f"port {server.port}\nbind 127.0.0.1\nprotected-mode yes\nrequirepass {server.password}\n"
        f'save ""\n{persistence}dir {root}\ndaemonize no\nlogfile ""\n'
    )
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
