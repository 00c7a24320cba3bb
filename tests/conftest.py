"""Shared, expensive fixtures: built once per test session.

Tests that use the real model, a Ray cluster or a browser are marked `model` / `ray` / `browser` here from the fixtures
they use, so `make test-fast` (`-m "not model and not ray"`) can never pick up a slow test by a forgotten marker. A
fixture reached through `request.getfixturevalue` is invisible to that: the fixture that calls it marks its params.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from serving.models import LoadedModel

# The project's modules are imported inside the fixtures: this file loads in every pytest process, xdist's controller
# included, which runs no test and would otherwise spend ~6 s importing torch and transformers before workers start.


def pytest_configure(config: pytest.Config) -> None:
    """Nothing a test starts (KV files on shutdown included) writes into the user's own data dir."""
    os.environ.setdefault("SESSIONSERVE_DATA_DIR", tempfile.mkdtemp(prefix="sessionserve-test-data-"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded model converted to safetensors (once per machine, ~20 s)."""
    from serving.models import prepare_smollm2

    return prepare_smollm2()


MODEL_FIXTURES = {"smollm2_dir", "smollm2", "local_client", "http_url", "http_client"}
RAY_FIXTURES = {"ray_cluster", "serve_port", "http_url", "http_client"}
BROWSER_FIXTURES = {"chromium_page"}  # tests/web/conftest.py
# With `--dist loadgroup` (make test) every test on the session's Ray cluster runs in one worker, so only that
# worker starts it; the other worker runs what starts its own processes (serve, Ray nodes) or needs no Ray.
SHARED_CLUSTER = "shared-ray-cluster"


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group(SHARED_CLUSTER))
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def tokenizer_dir():
    """SmolLM2's tokenizer files alone (seconds): enough for the tiny random models."""
    from serving.models import prepare_smollm2_tokenizer

    return prepare_smollm2_tokenizer()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> LoadedModel:
    """The real SmolLM2-135M-Instruct, fp32 on the CPU."""
    from serving.config import ModelConfig
    from serving.models import SMOLLM2, load_model

    return load_model(ModelConfig(name=SMOLLM2, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir) -> LoadedModel:
    """A 2-layer random Llama with SmolLM2's tokenizer: fast, for mechanics only."""
    from serving.config import ModelConfig
    from serving.models import TINY_RANDOM, load_model

    return load_model(ModelConfig(name=TINY_RANDOM, device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray cluster for the whole test session (~15 s to start)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    serve.shutdown()
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Ray Serve's HTTP proxy on a free loopback port (fixed for the cluster's life)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def local_client(smollm2_dir, tmp_path_factory):
    from serving.client import LocalClient
    from tests.support import smollm2_config

    store = f"sqlite:///{tmp_path_factory.mktemp('local') / 'sessions.db'}"
    client = LocalClient(smollm2_config(store))
    yield client
    client.close()


@pytest.fixture(scope="session")
def http_url(smollm2_dir, serve_port, tmp_path_factory):
    from tests.support import deploy, smollm2_config

    store = f"sqlite:///{tmp_path_factory.mktemp('http') / 'sessions.db'}"
    return deploy(smollm2_config(store), serve_port)


@pytest.fixture(scope="session")
def http_client(http_url):
    from serving.client import SessionClient

    client = SessionClient(http_url)
    yield client
    client.close()


# ---- real PostgreSQL and Redis servers (tests/servers.py); missing binaries fail, never skip -------------
@pytest.fixture(scope="session")
def postgres_server():
    from tests.servers import MissingServer, start_postgres

    try:
        server = start_postgres()
    except MissingServer as error:
        pytest.fail(str(error))
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """postgresql://user:password@127.0.0.1:PORT/postgres of a throwaway server shared by the test session."""
    return postgres_server.url


@pytest.fixture(scope="session")
def redis_server():
    from tests.servers import MissingServer, start_redis

    try:
        server = start_redis()
    except MissingServer as error:
        pytest.fail(str(error))
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    """redis://:password@127.0.0.1:PORT/0 of a throwaway server shared by the test session (use your own prefix)."""
    return redis_server.url
