"""Conversation state for sessionserve: messages, durable history, prompts, session lifecycle.

Pure Python on purpose (no torch, ray, fastapi, transformers, nor serving/): it can be tested in milliseconds and
reused by any engine; a tokenizer is taken by duck typing.
"""

from sessions.errors import (
    ContextTooLong,
    InvalidRequest,
    SessionBusy,
    SessionError,
    SessionExists,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from sessions.manager import EngineClient, SessionManager
from sessions.messages import Message, Role, parse_message, parse_messages
from sessions.prompt import Prompt, PromptBuilder
from sessions.store import UNCHANGED, HistoryStore, KVReport, MemoryStore, SessionRecord, SQLiteStore, open_store

__all__ = [
    "UNCHANGED",
    "ContextTooLong",
    "EngineClient",
    "HistoryStore",
    "InvalidRequest",
    "KVReport",
    "MemoryStore",
    "Message",
    "Prompt",
    "PromptBuilder",
    "Role",
    "SQLiteStore",
    "SessionBusy",
    "SessionError",
    "SessionExists",
    "SessionManager",
    "SessionNotFound",
    "SessionRecord",
    "StoreUnavailable",
    "TooManySessions",
    "open_store",
    "parse_message",
    "parse_messages",
]
