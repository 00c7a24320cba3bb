"""The terminal entry points, driven as a user would: typed lines in, streamed replies out."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from serving.cli import app

pytestmark = pytest.mark.model
runner = CliRunner()


def test_model_prepare_reports_the_ready_folder(smollm2_dir):
    result = runner.invoke(app, ["model", "prepare"])
    assert result.exit_code == 0, result.output
    assert "ready" in result.output and "smollm2" in result.output


def test_chat_local_streams_a_reply(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SESSIONSERVE_DATA_DIR", str(tmp_path))
    config = tmp_path / "chat.yaml"
    config.write_text("model: {device: cpu}\nsessions: {store: 'sqlite:///%s'}\n" % (tmp_path / "chat.db"))
    result = runner.invoke(
        app,
        ["chat", "--local", "--config", str(config), "--max-new-tokens", "16"],
        input="What is the capital of France?\n\n",
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert (tmp_path / "chat.db").exists()


def test_chat_over_http_resumes_a_session(http_url, http_client):
    sid = http_client.create_session("cli-resume")
    http_client.append(
        sid, [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada!"}]
    )
    result = runner.invoke(
        app,
        ["chat", "--url", http_url, "--session-id", sid, "--max-new-tokens", "12"],
        input="What is the capital of France?\n\n",
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert len(http_client.history(sid)) == 4
    http_client.destroy_session(sid)
