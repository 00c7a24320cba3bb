"""One contract, two clients: LocalClient (in-process) and SessionClient (HTTP on Ray Serve)."""

from __future__ import annotations

import uuid

import pytest

from serving.server.protocol import APIError

pytestmark = pytest.mark.model


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def test_capital_of_france(client):
    sid = client.create_session(new_id())
    reply = client.query("What is the capital of France?", session_id=sid, max_new_tokens=24)
    assert "Paris" in reply.response
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    client.destroy_session(sid)


def test_second_turn_reuses_first_turns_kv(client):
    sid = client.create_session(new_id(), system_prompt="You are terse.")
    first = client.query("Name a colour.", session_id=sid, max_new_tokens=8)
    second = client.query({"query": "Name another one."}, session_id=sid, max_new_tokens=8)  # MII call shape
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    history = client.history(sid)
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1].content == first.response and history[3].content == second.response
    info = client.session_info(sid)
    assert info.turns == 2 and info.kv.tokens >= second.usage.prompt_tokens
    client.destroy_session(sid)


def test_warm_brings_the_kv_back_and_the_next_turn_reuses_it(client):
    sid = client.create_session(
        new_id(), messages=[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    )
    cold = client.warm(sid)  # imported history, never run: prefilled now
    assert cold.source == "recomputed" and cold.cached_tokens == 0 and cold.tokens > 0 and cold.ms > 0
    again = client.warm(sid)
    assert again.source == "device" and again.cached_tokens == again.tokens - 1  # one token always recomputed
    turn = client.query("And now?", session_id=sid, max_new_tokens=4)
    assert turn.usage.cached_tokens == cold.tokens  # warm covered exactly the prefix every next turn shares
    expect(404, client.warm, new_id())
    client.destroy_session(sid)


def test_stream_pieces_form_the_committed_reply(client):
    sid = client.create_session(new_id())
    pieces = list(client.stream("Count from one to five.", session_id=sid, max_new_tokens=16))
    assert len(pieces) > 1
    assert client.history(sid)[-1].content == "".join(pieces)
    client.destroy_session(sid)


def test_stream_events_end_with_the_turns_result(client):
    sid = client.create_session(new_id())
    events = list(client.stream_events("Count from one to five.", session_id=sid, max_new_tokens=16))
    *pieces, result = events
    assert pieces and all(isinstance(piece, str) for piece in pieces)
    assert result.response == "".join(pieces) == client.history(sid)[-1].content
    assert result.usage.completion_tokens > 0 and 0 < result.timing.ttft_ms <= result.timing.total_ms
    client.destroy_session(sid)


def test_create_with_generated_id_and_initial_messages(client):
    sid = client.create_session(
        system_prompt="Be brief.",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "value": "hello"}]},
        ],
        metadata={"team": "a"},
    )
    assert len(sid) >= 16
    info = client.session_info(sid)
    assert info.system_prompt == "Be brief." and info.metadata == {"team": "a"} and info.turns == 1
    assert info.context_tokens > 0 and info.kv.tier == "none"
    assert [m.content for m in client.history(sid)] == ["hi", "hello"]
    client.destroy_session(sid)


def test_history_window_append_and_clear(client):
    sid = client.create_session(new_id(), system_prompt="Keep me.")
    first = client.append(sid, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    second = client.append(sid, [{"role": "user", "content": [{"type": "text", "text": "c"}]}])
    # an append answers the messages it stored (content parts joined), not the history before them
    assert [(m.role, m.content) for m in first] == [("user", "a"), ("assistant", "b")]
    assert [(m.role, m.content) for m in second] == [("user", "c")]
    assert [m.content for m in client.history(sid, window=2)] == ["b", "c"]
    client.clear(sid)
    assert client.history(sid) == []
    assert client.session_info(sid).system_prompt == "Keep me."
    client.destroy_session(sid)


def expect(status: int, call, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args, **kwargs)
    assert caught.value.status == status, caught.value
    assert caught.value.message
    return caught.value


def test_unknown_session_is_404_everywhere(client):
    missing = new_id()
    for call, args in [
        (client.session_info, (missing,)),
        (client.destroy_session, (missing,)),
        (client.history, (missing,)),
        (client.clear, (missing,)),
        (client.append, (missing, [{"role": "user", "content": "x"}])),
    ]:
        expect(404, call, *args)
    error = expect(404, client.query, "hello", session_id=missing)
    assert missing in error.message


def test_duplicate_id_is_409_and_keeps_the_original(client):
    sid = client.create_session(new_id(), system_prompt="original")
    expect(409, client.create_session, sid, system_prompt="impostor")
    assert client.session_info(sid).system_prompt == "original"
    client.destroy_session(sid)


@pytest.mark.parametrize(
    ("prompt", "params", "fragment"),
    [
        ("", {}, "prompt"),
        ("hi", {"max_new_tokens": -1}, "max_new_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0}, "top_p"),
    ],
)
def test_bad_query_is_422_and_stores_nothing(client, prompt, params, fragment):
    sid = client.create_session(new_id())
    client.append(sid, [{"role": "user", "content": "before"}, {"role": "assistant", "content": "ok"}])
    error = expect(422, client.query, prompt, session_id=sid, **params)
    assert fragment in error.message
    assert [m.content for m in client.history(sid)] == ["before", "ok"]
    client.destroy_session(sid)


def test_bad_messages_are_422_and_store_nothing(client):
    sid = client.create_session(new_id())
    error = expect(422, client.append, sid, [{"role": "user", "content": "ok"}, {"role": "wizard", "content": "x"}])
    assert "role" in error.message
    expect(422, client.append, sid, [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    assert client.history(sid) == []
    expect(422, client.create_session, new_id(), messages=[{"role": "villain", "content": "x"}])
    client.destroy_session(sid)


def test_prompt_that_cannot_fit_is_413_and_stores_nothing(client):
    sid = client.create_session(new_id())
    error = expect(413, client.query, "word " * 2000, session_id=sid, max_new_tokens=16)
    assert "token" in error.message
    assert client.history(sid) == []
    client.destroy_session(sid)


def test_trimming_drops_oldest_turns_keeps_system_prompt(client):
    sid = client.create_session(new_id(), system_prompt="You answer in English.")
    filler = "This is an old message about nothing in particular. " * 12
    client.append(sid, [{"role": r, "content": f"{i}: {filler}"} for i in range(12) for r in ("user", "assistant")])
    reply = client.query("What is the capital of France?", session_id=sid, max_new_tokens=16)
    assert reply.usage.prompt_tokens + 16 <= 1024  # the configured max_model_len
    assert "Paris" in reply.response
    assert len(client.history(sid)) == 26  # trimming shapes the prompt, never the stored history
    client.destroy_session(sid)


def test_fork_shares_history_and_continues_like_its_parent(client):
    parent = client.create_session(new_id(), system_prompt="You are terse.")
    client.query("What is the capital of France?", session_id=parent, max_new_tokens=12)
    child = client.fork(parent)
    assert child != parent
    assert [m.content for m in client.history(child)] == [m.content for m in client.history(parent)]
    from_child = client.query("And of Italy?", session_id=child, max_new_tokens=12)
    from_parent = client.query("And of Italy?", session_id=parent, max_new_tokens=12)
    assert from_child.response == from_parent.response  # greedy: same history, same answer
    assert from_child.usage.cached_tokens > 0  # the child started from the parent's KV
    assert len(client.history(child)) == 4 and len(client.history(parent)) == 4
    expect(409, client.fork, parent, child)
    expect(404, client.fork, new_id())
    client.destroy_session(child)
    client.destroy_session(parent)


def test_list_and_update_sessions(client):
    first = client.create_session(new_id(), system_prompt="One.", metadata={"title": "a"})
    second = client.create_session(new_id())
    client.append(first, [{"role": "user", "content": "touch"}])  # now the most recently active
    listed = [s.session_id for s in client.list_sessions(limit=1000).sessions]
    assert listed.index(first) < listed.index(second)
    page = client.list_sessions(limit=1)
    assert len(page.sessions) == 1 and page.next_offset == 1

    updated = client.update_session(first, metadata={"title": "b"})
    assert updated.metadata == {"title": "b"} and updated.system_prompt == "One."  # left out: unchanged
    cleared = client.update_session(first, system_prompt=None)
    assert cleared.system_prompt is None and cleared.metadata == {"title": "b"}
    with pytest.raises(APIError) as missing:
        client.update_session("no-such-session", metadata={})
    assert missing.value.status == 404
    with pytest.raises(APIError) as bad:
        client.update_session(first, metadata=["not", "an", "object"])
    assert bad.value.status == 422 and client.session_info(first).metadata == {"title": "b"}
    client.destroy_session(first)
    client.destroy_session(second)


def test_kv_policy_pinned_keeps_kv_and_accounts_the_first_turn_as_recomputed(client):
    sid = client.create_session(new_id(), system_prompt="You are terse.")
    assert client.session_info(sid).kv.policy == "pinned"  # the configured default
    first = client.query("Name a colour.", session_id=sid, max_new_tokens=8)
    second = client.query("Name another one.", session_id=sid, max_new_tokens=8)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    info = client.session_info(sid)
    assert info.usage.prompt_tokens == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert info.usage.cached_tokens == second.usage.cached_tokens
    assert info.usage.completion_tokens == first.usage.completion_tokens + second.usage.completion_tokens
    assert info.usage.recomputed_tokens == first.usage.prompt_tokens  # the first turn's; the second found its KV
    assert info.kv.tier == "device"
    client.destroy_session(sid)


def test_kv_policy_none_keeps_history_only_and_recomputes_every_turn(client):
    sid = client.create_session(new_id(), system_prompt="You are terse.", kv="none")
    first = client.query("Name a colour.", session_id=sid, max_new_tokens=8)
    second = client.query("Name another one.", session_id=sid, max_new_tokens=8)
    assert first.usage.cached_tokens == second.usage.cached_tokens == 0
    info = client.session_info(sid)
    assert (info.kv.policy, info.kv.tier, info.kv.tokens) == ("none", "none", 0)
    assert [m.content for m in client.history(sid)][1::2] == [first.response, second.response]
    # the second turn recomputed all the first turn left in context but the reply's last token
    context = first.usage.prompt_tokens + first.usage.completion_tokens
    assert info.usage.recomputed_tokens == first.usage.prompt_tokens + context - 1
    client.destroy_session(sid)


def test_kv_policy_evictable_reuses_its_kv_while_nothing_needs_the_room(client):
    sid = client.create_session(new_id(), kv="evictable")
    first = client.query("Name a colour.", session_id=sid, max_new_tokens=8)
    second = client.query("Name another one.", session_id=sid, max_new_tokens=8)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert client.session_info(sid).kv.policy == "evictable"
    fork = client.fork(sid, new_id())
    assert client.session_info(fork).kv.policy == "evictable"  # a fork keeps its parent's policy
    client.destroy_session(fork)
    client.destroy_session(sid)


def test_unknown_kv_policy_is_422(client):
    with pytest.raises(APIError) as caught:
        client.create_session(new_id(), kv="sticky")
    assert caught.value.status == 422 and "kv" in caught.value.message
