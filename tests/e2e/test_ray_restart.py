"""The Ray app can be redeployed on the same SQLite file and KV dir without losing a session or its KV."""

from __future__ import annotations

import pytest
from ray import serve

from serving.client import SessionClient
from tests.support import deploy, smollm2_config

pytestmark = [pytest.mark.model, pytest.mark.ray]


def test_history_and_kv_survive_an_app_restart(smollm2_dir, serve_port, tmp_path):
    config = smollm2_config(f"sqlite:///{tmp_path / 'restart.db'}")
    name, prefix = "sessionserve-restart", "/restart"
    url = deploy(config, serve_port, name, prefix)
    with SessionClient(url) as client:
        sid = client.create_session("survivor")
        first = client.query("What is the capital of France?", session_id=sid, max_new_tokens=16)
    serve.delete(name)
    url = deploy(config, serve_port, name, prefix)  # new replicas: empty pools, same history file and KV dir
    try:
        with SessionClient(url) as client:
            assert [m.content for m in client.history(sid)] == ["What is the capital of France?", first.response]
            second = client.query("And of Spain?", session_id=sid, max_new_tokens=16)
            assert second.usage.cached_tokens >= first.usage.prompt_tokens  # written on the stop, loaded from disk
            assert "Madrid" in second.response
            assert len(client.history(sid)) == 4
    finally:
        serve.delete(name)
