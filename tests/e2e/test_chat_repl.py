"""`sessionserve chat` in a real pseudo-terminal (pexpect) against the shared Ray Serve app: commands are handled
by the terminal and never reach the model, replies stream with a dim footer of cached tokens and TTFT."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pexpect
import pytest

from tests.paths import REPO

PROMPT = "you>"
DIM = "\x1b[2m"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn_chat(url: str, *args: str, max_new_tokens: int = 16) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "COLUMNS": "200"}
    env.pop("NO_COLOR", None)
    args = ("chat", "--url", url, "--max-new-tokens", str(max_new_tokens), *args)
    return pexpect.spawn(
        sys.executable,
        ["-m", "serving.cli", *args],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 200),
        # as in a terminal: a test run started in the background (`make test &`) ignores SIGINT, children inherit
        # that, and Python then installs no KeyboardInterrupt handler at all
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def until_prompt(chat: pexpect.spawn) -> str:
    """What the terminal showed up to the next `you>` prompt, colours removed."""
    chat.expect_exact(PROMPT)
    return ANSI.sub("", chat.before)


def test_commands_streaming_footer_fork_and_switch(http_url, http_client):
    chat = spawn_chat(http_url, "--system-prompt", "You are a helpful assistant.")
    start = until_prompt(chat)
    sid = re.search(r"session (\S+) \(new\)", start).group(1)
    assert http_client.session_info(sid).system_prompt == "You are a helpful assistant."

    chat.sendline("/help")
    shown = until_prompt(chat)
    for command in ("/help", "/new", "/sessions", "/switch ID", "/fork", "/history [N]", "/system", "/stats", "/quit"):
        assert command in shown

    chat.sendline("/bogus")
    assert "unknown command /bogus" in until_prompt(chat) and "/help" in shown
    assert http_client.history(sid) == []  # never sent to the model

    chat.sendline("What is the capital of France?")
    chat.expect(r"\x1b\[2m(\d+)/(\d+) prompt tokens cached · TTFT (\d+) ms")  # the footer, dim
    first_cached, first_prompt = int(chat.match.group(1)), int(chat.match.group(2))
    streamed = ANSI.sub("", chat.before)
    until_prompt(chat)
    [user, bot] = http_client.history(sid)
    assert user.content == "What is the capital of France?" and "Paris" in bot.content
    assert f"bot> {bot.content.strip()}" in streamed  # streamed to the terminal as committed
    assert first_cached == 0 and first_prompt > 0

    chat.sendline("And of Italy?")
    chat.expect(r"\x1b\[2m(\d+)/(\d+) prompt tokens cached")
    assert int(chat.match.group(1)) >= first_prompt  # the first turn's KV was reused
    until_prompt(chat)

    chat.sendline("/history 2")
    shown = until_prompt(chat)
    assert "user> And of Italy?" in shown and "assistant> " in shown and "capital of France" not in shown

    chat.sendline("/history x")
    assert "usage: /history [N]" in until_prompt(chat)

    chat.sendline("/system Answer in one word.")
    assert "system prompt set" in until_prompt(chat)
    assert http_client.session_info(sid).system_prompt == "Answer in one word."

    chat.sendline("/stats")
    shown = until_prompt(chat)
    assert f"session {sid}: 2 turns, 4 messages" in shown and "this chat: 2 replies, TTFT median" in shown

    chat.sendline("/fork")
    child = re.search(rf"forked {sid} -> session (\S+)", until_prompt(chat)).group(1)
    assert http_client.history(child) == http_client.history(sid)

    chat.sendline("/sessions")
    shown = until_prompt(chat)
    assert re.search(rf"\*\s+{child}", shown) and sid in shown  # the current one is starred

    chat.sendline("/switch no-such-session")
    assert "no session 'no-such-session'" in until_prompt(chat)  # the server's 404 message; we stay put
    chat.sendline(f"/switch {sid}")
    assert f"session {sid} (2 turns)" in until_prompt(chat)

    chat.sendline("//help")  # a message that starts with / is sent with //
    chat.expect(r"prompt tokens cached")
    until_prompt(chat)
    assert http_client.history(sid, 2)[0].content == "/help"
    assert len(http_client.history(child)) == 4  # the fork was left as it was

    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    for session in (sid, child):
        http_client.destroy_session(session)


@pytest.mark.parametrize("existing", [True, False])
def test_session_id_resumes_or_creates(http_url, http_client, existing):
    sid = f"repl-{'old' if existing else 'new'}"
    if existing:
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        http_client.create_session(sid, messages=turn)
    chat = spawn_chat(http_url, "--session-id", sid)
    assert (f"session {sid} (1 turn)" if existing else f"session {sid} (new)") in until_prompt(chat)
    for _ in range(5):  # Ctrl-D quits; one typed while readline switches the tty's mode can be lost, so retype
        chat.sendcontrol("d")
        if chat.expect([pexpect.EOF, pexpect.TIMEOUT], timeout=5) == 0:
            break
    chat.close()
    assert chat.exitstatus == 0
    http_client.destroy_session(sid)


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(http_url, http_client):
    chat = spawn_chat(http_url, max_new_tokens=400)
    sid = re.search(r"session (\S+) \(new\)", until_prompt(chat)).group(1)
    chat.sendline("Write a long story about a dragon who learns to cook.")
    chat.expect_exact("bot>")
    time.sleep(1)
    chat.sendintr()
    chat.expect_exact("(interrupted)")
    until_prompt(chat)
    chat.sendline("/stats")
    assert f"session {sid}:" in until_prompt(chat)  # still chatting
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    http_client.destroy_session(sid)
