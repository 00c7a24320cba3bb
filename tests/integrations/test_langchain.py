"""SessionChatMessageHistory with the real langchain-core on a real Ray Serve server (the shared session app):
history written through LangChain is read back through our API and the reverse, and a ChatOpenAI chain on
our /v1 keeps its memory in a session."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from serving.integrations.langchain import SessionChatMessageHistory
from serving.server.protocol import APIError


def new_id() -> str:
    return f"lc-{uuid.uuid4().hex[:12]}"


def test_written_through_langchain_read_through_our_api(http_client):
    sid = new_id()
    history = SessionChatMessageHistory(http_client, sid)
    assert history.messages == []  # a session that does not exist yet reads as empty
    history.add_messages(
        [SystemMessage("You are terse."), HumanMessage("Hi"), AIMessage([{"type": "text", "text": "Hello"}, "!"])]
    )
    history.add_user_message("Still there?")

    assert http_client.session_info(sid).system_prompt == "You are terse."
    assert [(m.role, m.content) for m in http_client.history(sid)] == [
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Still there?"),
    ]
    assert history.messages == [
        SystemMessage("You are terse."),
        HumanMessage("Hi"),
        AIMessage("Hello!"),
        HumanMessage("Still there?"),
    ]
    history.add_messages([SystemMessage("You are verbose."), ChatMessage(role="assistant", content="Yes.")])
    assert http_client.session_info(sid).system_prompt == "You are verbose."  # replaced through PATCH
    assert history.messages[0] == SystemMessage("You are verbose.") and history.messages[-1] == AIMessage("Yes.")
    http_client.destroy_session(sid)


def test_turns_through_our_api_read_through_langchain(http_client):
    sid = http_client.create_session(new_id(), system_prompt="You are a helpful assistant.")
    reply = http_client.query("What is the capital of France?", session_id=sid, max_new_tokens=16)
    assert SessionChatMessageHistory(http_client, sid).messages == [
        SystemMessage("You are a helpful assistant."),
        HumanMessage("What is the capital of France?"),
        AIMessage(reply.response),
    ]
    http_client.destroy_session(sid)


@pytest.mark.parametrize(
    ("message", "named"),
    [
        (ToolMessage("42", tool_call_id="call-1"), "ToolMessage"),
        (AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "call-1"}]), "AIMessage with tool calls"),
        (ChatMessage(role="tool", content="x"), "ChatMessage with role 'tool'"),
        (HumanMessage([{"type": "image_url", "image_url": {"url": "data:,"}}]), "'image_url' content block"),
    ],
)
def test_kinds_a_session_cannot_hold_are_refused_and_nothing_is_written(http_client, message, named):
    sid = new_id()
    history = SessionChatMessageHistory(http_client, sid)
    with pytest.raises(ValueError, match="supported: HumanMessage") as refused:
        history.add_messages([SystemMessage("s"), HumanMessage("kept?"), message])
    assert named in str(refused.value)
    with pytest.raises(APIError) as missing:
        http_client.session_info(sid)
    assert missing.value.status == 404  # refused before any write: not even created


def test_clear_forgets_messages_and_system_prompt_but_keeps_the_session(http_client):
    sid = new_id()
    history = SessionChatMessageHistory(http_client, sid)
    history.clear()  # nothing to clear: no error
    history.add_messages([SystemMessage("s"), HumanMessage("a"), AIMessage("b")])
    http_client.update_session(sid, metadata={"title": "kept"})
    history.clear()
    assert history.messages == []
    info = http_client.session_info(sid)
    assert info.system_prompt is None and info.messages == 0 and info.metadata == {"title": "kept"}
    http_client.destroy_session(sid)


def test_chat_openai_chain_with_session_history_remembers_across_turns(http_url, http_client):
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory
    from langchain_openai import ChatOpenAI

    sent: list[dict] = []
    recorder = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    llm = ChatOpenAI(
        base_url=f"{http_url}/v1", api_key="any", model="any", temperature=0, max_tokens=24, http_client=recorder
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a helpful assistant."), MessagesPlaceholder("history"), ("human", "{input}")]
    )
    chain = RunnableWithMessageHistory(
        prompt | llm,
        lambda sid: SessionChatMessageHistory(http_client, sid),
        input_messages_key="input",
        history_messages_key="history",
    )
    sid = new_id()
    config = {"configurable": {"session_id": sid}}
    first = chain.invoke({"input": "My name is Alice."}, config=config)
    second = chain.invoke({"input": "What is my name?"}, config=config)

    assert [(m.role, m.content) for m in http_client.history(sid)] == [
        ("user", "My name is Alice."),
        ("assistant", first.content),
        ("user", "What is my name?"),
        ("assistant", second.content),
    ]
    assert sent[1]["messages"] == [  # the second prompt carries the first turn, read back from the session
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Alice."},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": "What is my name?"},
    ]
    # (Whether SmolLM2-135M then answers "Alice" is the model's business: it often does not.)
    recorder.close()
    http_client.destroy_session(sid)
