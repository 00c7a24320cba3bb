"""The official `openai` client against /v1: stateless chats, session chats (x-session-id), streaming, models."""

from __future__ import annotations

import uuid

import httpx
import pytest

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.model, pytest.mark.ray]

MODEL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def oai(http_url):
    client = openai.OpenAI(base_url=f"{http_url}/v1", api_key="x", max_retries=0, timeout=120)
    yield client
    client.close()


def new_id() -> str:
    return f"oai-{uuid.uuid4().hex[:12]}"


def history(http_url: str, sid: str) -> list[dict]:
    response = httpx.get(f"{http_url}/v1/sessions/{sid}/messages", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["messages"]


def test_stateless_chat_answers_the_capital_of_france(oai):
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        temperature=0,
        max_tokens=16,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_stateless_chat_uses_the_whole_message_list(oai):
    """Earlier turns sent by the client count: the prompt grows with them, and nothing is stored."""
    short = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "And of Italy?"}], temperature=0, max_tokens=4
    )
    long = oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
        temperature=0,
        max_tokens=4,
    )
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 10


def test_session_chat_grows_the_history_and_reuses_kv(oai, http_url):
    sid = new_id()
    headers = {"x-session-id": sid}
    first = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
        extra_headers=headers,
    )
    assert "Paris" in first.choices[0].message.content
    after_one = history(http_url, sid)
    assert after_one == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first.choices[0].message.content},
    ]
    second = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "And of Italy?"}],  # only the new turn: the server holds the rest
        temperature=0,
        max_tokens=8,
        extra_headers=headers,
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens - 2
    after_two = history(http_url, sid)
    assert after_two[:2] == after_one and len(after_two) == 4
    assert after_two[2:] == [
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": second.choices[0].message.content},
    ]
    assert httpx.delete(f"{http_url}/v1/sessions/{sid}", timeout=30).status_code == 204


def test_a_session_created_on_first_use_takes_its_kv_policy_from_extra_body(oai, http_url):
    sid = new_id()

    def turn(content: str, kv: str | None):
        return oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=4,
            extra_headers={"x-session-id": sid},
            extra_body={} if kv is None else {"kv": kv},
        )

    turn("Hi", "none")
    second = turn("Hi again", None)  # later requests may leave kv out
    assert second.usage.prompt_tokens_details.cached_tokens == 0  # history only: prefilled every turn
    info = httpx.get(f"{http_url}/v1/sessions/{sid}", timeout=30).json()
    assert info["kv"]["policy"] == "none" and info["usage"]["recomputed_tokens"] > 0
    with pytest.raises(openai.UnprocessableEntityError, match="KV policy"):
        turn("Once more", "pinned")  # the policy was chosen when the session was created
    assert httpx.delete(f"{http_url}/v1/sessions/{sid}", timeout=30).status_code == 204


def test_streaming_chunks_form_the_reply(oai, http_url):
    sid = new_id()
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
        stream=True,
        extra_headers={"x-session-id": sid},
    )
    chunks = list(stream)
    assert len(chunks) > 2
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" in text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    final_usage = chunks[-1].usage
    assert final_usage is not None and final_usage.completion_tokens > 0
    assert history(http_url, sid)[-1] == {"role": "assistant", "content": text}
    assert httpx.delete(f"{http_url}/v1/sessions/{sid}", timeout=30).status_code == 204


def test_streaming_matches_non_streaming_at_temperature_zero(oai):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    pieces = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
    assert text == whole.choices[0].message.content


def test_models_list(oai):
    models = oai.models.list()
    ids = [model.id for model in models.data]
    assert ids == [MODEL]
    assert models.data[0].object == "model"


def test_openai_errors_are_raised_with_their_status(oai):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert caught.value.status_code == 422
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=9
        )
    assert caught.value.status_code == 422
    assert "temperature" in str(caught.value)


def test_unknown_fields_are_ignored_on_chat_completions(http_url):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi", "name": "bob"}],
        "max_tokens": 4,
        "temperature": 0,
        "logit_bias": {"1": 2},
        "user": "someone",
        "stream_options": {"include_usage": True},
        "some_future_field": [1, 2, 3],
    }
    response = httpx.post(f"{http_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
