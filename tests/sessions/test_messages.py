from __future__ import annotations

import pytest

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
from sessions.messages import Message, parse_message, parse_messages


def test_error_codes_are_stable_and_share_a_base():
    expected = {
        SessionNotFound: "session_not_found",
        SessionExists: "session_exists",
        InvalidRequest: "invalid_request",
        ContextTooLong: "context_too_long",
        SessionBusy: "session_busy",
        TooManySessions: "too_many_sessions",
        StoreUnavailable: "store_unavailable",
    }
    for cls, code in expected.items():
        assert issubclass(cls, SessionError)
        assert cls.code == code
        assert cls("what to fix").code == code
        assert str(cls("what to fix")) == "what to fix"
        assert cls.__doc__
    assert SessionError.code == SessionError("x").code == "session_error"


def test_an_error_subclass_without_a_code_keeps_its_parents():
    class Gone(SessionNotFound):
        pass

    class Renamed(SessionNotFound, code="renamed"):
        pass

    assert Gone("x").code == "session_not_found" and Renamed("x").code == "renamed"
    assert SessionNotFound.code == "session_not_found"


def test_string_content():
    assert parse_message({"role": "user", "content": "hi"}) == Message("user", "hi")


def test_message_passes_through_and_round_trips():
    message = Message("assistant", "hello")
    assert parse_message(message) is message
    assert parse_message(message.to_dict()) == message
    assert message.to_dict() == {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("key", ["text", "value"])  # OpenAI and MLServer spellings
def test_text_parts_are_joined_in_order(key):
    parts = [{"type": "text", key: "one "}, {"type": "text", key: "two"}, {"type": "text", key: "!"}]
    assert parse_message({"role": "user", "content": parts}).content == "one two!"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "image", "value": "..."},
    ],
)
def test_media_parts_are_refused_as_text_only(part):
    with pytest.raises(InvalidRequest, match="text-only"):
        parse_message({"role": "user", "content": [{"type": "text", "text": "look"}, part]})


@pytest.mark.parametrize("role", ["tool", "developer", "", None, "User"])
def test_unknown_role_names_the_allowed_roles(role):
    with pytest.raises(InvalidRequest) as caught:
        parse_message({"role": role, "content": "x"})
    for allowed in ("system", "user", "assistant"):
        assert allowed in str(caught.value)


@pytest.mark.parametrize("content", [None, 3, {"text": "x"}, b"bytes", [{"type": "text", "text": 5}], ["plain"]])
def test_non_string_content_is_refused(content):
    with pytest.raises(InvalidRequest):
        parse_message({"role": "user", "content": content})


@pytest.mark.parametrize("obj", ["user: hi", {"role": "user"}, {"content": "hi"}, None])
def test_malformed_message_is_refused(obj):
    with pytest.raises(InvalidRequest):
        parse_message(obj)


def test_unknown_part_type_is_refused():
    with pytest.raises(InvalidRequest, match="not supported"):
        parse_message({"role": "user", "content": [{"type": "tool_result", "text": "x"}]})


def test_message_constructor_validates():
    with pytest.raises(InvalidRequest):
        Message("robot", "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        Message("user", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="surrogate"):
        Message("user", "bad \ud800 text")  # valid JSON escape, not storable text


def test_parse_messages_names_the_bad_index():
    good = {"role": "user", "content": "a"}
    with pytest.raises(InvalidRequest, match=r"messages\[2\]"):
        parse_messages([good, good, {"role": "robot", "content": "b"}])
    assert parse_messages([good, Message("assistant", "b")]) == [Message("user", "a"), Message("assistant", "b")]


@pytest.mark.parametrize("items", ["hello", {"role": "user", "content": "x"}, 5])
def test_parse_messages_needs_a_list(items):
    with pytest.raises(InvalidRequest, match="list"):
        parse_messages(items)
