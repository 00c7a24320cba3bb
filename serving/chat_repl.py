"""The terminal chat behind `sessionserve chat`: a line is a message to the model, unless it is a /command.

Replies stream as they are generated, with a dim footer saying how much of the prompt came from the session's
KV cache and how long the first token took. Commands never reach the model: an unknown `/x` gets a hint, and
`//text` sends `/text` as a message.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from serving.server import protocol
from serving.server.protocol import APIError

if TYPE_CHECKING:
    from serving.client import LocalClient, SessionClient

COMMANDS = (
    ("/help", "this list"),
    ("/new", "start a new session (with --system-prompt, if given)"),
    ("/sessions", "your sessions, most recently active first"),
    ("/switch ID", "continue session ID"),
    ("/fork", "copy this session (history and KV) and continue in the copy"),
    ("/history [N]", "the last N messages (all without N)"),
    ("/system [TEXT]", "set this session's system prompt (show it without TEXT)"),
    ("/stats", "this session's turns, context and KV, and this chat's reply times"),
    ("/quit", "leave (also Ctrl-D); sessions stay on the server"),
)


@dataclass
class _Replies:
    """What this chat measured of its replies (for /stats)."""

    ttft_ms: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, result: protocol.QueryResponse) -> None:
        self.ttft_ms.append(result.timing.ttft_ms)
        self.prompt_tokens += result.usage.prompt_tokens
        self.cached_tokens += result.usage.cached_tokens


def turns(n: int) -> str:
    return f"{n} turn" if n == 1 else f"{n} turns"


def footer(result: protocol.QueryResponse) -> str:
    usage, timing = result.usage, result.timing
    return (
        f"{usage.cached_tokens}/{usage.prompt_tokens} prompt tokens cached · TTFT {timing.ttft_ms:.0f} ms · "
        f"{usage.completion_tokens} tokens in {timing.total_ms / 1000:.2f} s"
    )


class ChatREPL:
    def __init__(
        self,
        client: SessionClient | LocalClient,
        console: Console,
        *,
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
    ) -> None:
        self.client = client
        self.console = console
        self.system_prompt = system_prompt  # for /new
        self.max_new_tokens = max_new_tokens
        self.session_id = ""
        self.replies = _Replies()
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self.help,
            "/new": self.new,
            "/sessions": self.sessions,
            "/switch": self.switch,
            "/fork": self.fork,
            "/history": self.history,
            "/system": self.system,
            "/stats": self.stats,
            "/quit": self.quit,
            "/exit": self.quit,
        }

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self, session_id: str | None) -> None:
        """Resume `session_id` (created if it does not exist) or start a new session, then read lines until /quit."""
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  # line editing and ↑ history for input()
        if session_id is None:
            self.new("")
        else:
            self.resume(session_id)
        self.note("/help lists the commands")
        while True:
            try:
                line = self.console.input("[bold cyan]you>[/] ").strip()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                try:
                    if not self.command(line):
                        return
                except APIError as error:
                    self.console.print(error.message, style="red", markup=False, highlight=False)
                continue
            self.turn(line[1:] if line.startswith("//") else line)

    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, argument = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            self.warn(f"unknown command {name}: /help lists the commands (start a message with // to send a leading /)")
            return True
        return handler(argument.strip())

    def turn(self, text: str) -> None:
        self.console.print("[bold magenta]bot>[/] ", end="")
        result: protocol.QueryResponse | None = None
        events = self.client.stream_events(text, session_id=self.session_id, max_new_tokens=self.max_new_tokens)
        try:
            with contextlib.closing(events):  # closing an interrupted stream cancels its turn
                for event in events:
                    if isinstance(event, str):
                        self.console.print(event, end="", markup=False, highlight=False)
                    else:
                        result = event
        except APIError as error:
            self.console.print(error.message, style="red", end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            self.console.print(" (interrupted)", style="yellow", end="", markup=False, highlight=False)
        self.console.print()
        if result is not None:
            self.replies.add(result)
            self.note(footer(result))

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def warn(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False, highlight=False)

    # ---- commands (each returns False to leave) ---------------------------------------------------------------
    def help(self, _: str) -> bool:
        table = Table.grid(padding=(0, 2))
        for usage, what in COMMANDS:
            table.add_row(f"[bold]{escape(usage)}[/]", what)
        self.console.print(table)
        self.note("Anything else is sent to the model; //text sends /text. Ctrl-C stops a reply.")
        return True

    def new(self, _: str) -> bool:
        self.session_id = self.client.create_session(system_prompt=self.system_prompt)
        self.note(f"session {self.session_id} (new)")
        return True

    def resume(self, session_id: str) -> None:
        try:
            info = self.client.session_info(session_id)
        except APIError as error:
            if error.code != "session_not_found":
                raise
            self.session_id = self.client.create_session(session_id, system_prompt=self.system_prompt)
            self.note(f"session {self.session_id} (new)")
            return
        self.session_id = session_id
        self.note(f"session {session_id} ({turns(info.turns)})")

    def sessions(self, _: str) -> bool:
        listing = self.client.list_sessions(limit=50)
        table = Table("", "session", "last active", "KV", "system prompt", box=None, header_style="bold")
        for s in listing.sessions:
            active = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.last_active_at))
            prompt = (s.system_prompt or "")[:40]
            table.add_row(
                "*" if s.session_id == self.session_id else "",
                s.session_id,
                active,
                f"{s.kv.tier} {s.kv.tokens}",
                escape(prompt),
            )
        self.console.print(table)
        if listing.next_offset is not None:
            self.note("(the 50 most recent)")
        return True

    def switch(self, argument: str) -> bool:
        if not argument:
            self.warn("usage: /switch ID (/sessions lists them)")
            return True
        info = self.client.session_info(argument)  # 404 -> printed by the loop; we stay where we are
        self.session_id = info.session_id
        self.note(f"session {self.session_id} ({turns(info.turns)})")
        return True

    def fork(self, _: str) -> bool:
        parent, self.session_id = self.session_id, self.client.fork(self.session_id)
        self.note(f"forked {parent} -> session {self.session_id}")
        return True

    def history(self, argument: str) -> bool:
        window: int | None = None
        if argument:
            if not argument.isdigit() or int(argument) < 1:
                self.warn("usage: /history [N], N a whole number of messages, at least 1")
                return True
            window = int(argument)
        messages = self.client.history(self.session_id, window)
        for message in messages:
            colour = "cyan" if message.role == "user" else "magenta"
            self.console.print(f"[{colour}]{message.role}>[/] {escape(message.content)}", highlight=False)
        if not messages:
            self.note("(no messages yet)")
        return True

    def system(self, argument: str) -> bool:
        if not argument:
            prompt = self.client.session_info(self.session_id).system_prompt
            self.note(f"system prompt: {prompt}" if prompt is not None else "no system prompt")
            return True
        self.client.update_session(self.session_id, system_prompt=argument)
        self.note("system prompt set")
        return True

    def stats(self, _: str) -> bool:
        info = self.client.session_info(self.session_id)
        self.note(
            f"session {info.session_id}: {turns(info.turns)}, {info.messages} messages, {info.context_tokens} context"
            f" tokens, KV {info.kv.tokens} tokens on {info.kv.tier}"
        )
        replies = self.replies
        if replies.ttft_ms:
            share = replies.cached_tokens / replies.prompt_tokens if replies.prompt_tokens else 0.0
            self.note(
                f"this chat: {len(replies.ttft_ms)} replies, TTFT median {statistics.median(replies.ttft_ms):.0f} ms,"
                f" {share:.0%} of prompt tokens cached"
            )
        return True

    def quit(self, _: str) -> bool:
        return False
