"""The deployment keeps the PostgreSQL password out of every config: the store URL names none, and libpq reads
PGPASSWORD from the environment (set from a Kubernetes Secret in deploy/kuberay/rayservice.yaml). This checks that
the project's PostgreSQL store really connects that way, against a real server with password authentication."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sessions.errors import StoreUnavailable
from sessions.store import open_store
from tests.servers import PostgresServer, start_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()  # a missing server binary fails here with how to install it
    yield server
    server.close()


def url_without_password(server: PostgresServer) -> str:
    return f"postgresql://{server.user}@127.0.0.1:{server.port}/{server.database}?timeout=3"


def test_the_store_connects_with_the_password_from_pgpassword(postgres: PostgresServer, monkeypatch) -> None:
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    store = open_store(url_without_password(postgres))  # connects and migrates the schema right away
    store.close()


def test_without_pgpassword_the_same_url_is_refused(postgres: PostgresServer, monkeypatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")  # nor a ~/.pgpass that might know it
    with pytest.raises(StoreUnavailable):
        open_store(url_without_password(postgres))
