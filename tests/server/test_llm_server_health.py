"""The model replica's health is real: a failing engine step fails in-flight turns clearly and makes
`check_health` raise, which is what Ray Serve uses to replace the replica. Runs the replica class in-process."""

from __future__ import annotations

import pytest

from serving.server.llm_server import LLMServer
from serving.server.protocol import CreateSessionRequest, QueryRequest
from tests.support import TINY, app_config


@pytest.fixture
async def replica(tokenizer_dir):
    config = app_config("memory://", model=TINY, torch_threads=1)  # in-process: one process, memory is shared
    server = LLMServer.func_or_class(config.model_dump(mode="json"))
    yield server
    stopping = server.__del__()  # what Ray Serve does on a graceful stop
    assert stopping is not None
    await stopping


async def test_a_failing_engine_step_fails_turns_and_the_replica_reports_unhealthy(replica):
    await replica.check_health()
    assert await replica.ready() is None
    await replica.api.create_session(CreateSessionRequest(session_id="h"))  # (the ingress' job in a deployment)

    def broken_forward(out):
        raise RuntimeError("injected forward failure")

    replica.api.service.engine.core.runner.execute = broken_forward
    reply = await replica.query("h", QueryRequest(prompt="Hello there", max_new_tokens=4), None)
    assert reply.error is not None and reply.error.status == 503 and reply.error.code == "engine_unavailable"
    assert "injected forward failure" in reply.error.message
    with pytest.raises(RuntimeError, match="injected forward failure"):
        await replica.check_health()
    assert "injected forward failure" in await replica.ready()
    history = await replica.api.messages("h")
    assert history.messages == []  # the failed turn committed nothing
