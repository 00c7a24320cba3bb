"""HeldHistories: what a process's turns keep of each session's history, bounded, merged with what a load answers."""

from __future__ import annotations

from sessions.held import HeldHistories, _size
from sessions.messages import Message
from sessions.store.base import HistoryPrefix, SessionRecord

U1, A1, U2 = Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2")


def record(session_id: str, history_id: str) -> SessionRecord:
    return SessionRecord(session_id, None, {}, 0.0, 0.0, history_id=history_id)


def test_a_load_past_the_held_prefix_is_merged_and_a_whole_one_replaces_it():
    held = HeldHistories()
    assert held.loaded("s1", None, record("s1", "h1"), [U1, A1]) == [U1, A1]
    first = held.get("s1")
    assert first is not None and first.prefix == HistoryPrefix("h1", 2)
    assert held.loaded("s1", first, record("s1", "h1"), [U2]) == [U1, A1, U2]  # the same history: after the prefix
    assert held.get("s1").prefix == HistoryPrefix("h1", 3)
    assert held.loaded("s1", held.get("s1"), record("s1", "h2"), [U2]) == [U2]  # a new history: the load's whole one
    assert held.get("s1").prefix == HistoryPrefix("h2", 1)


def test_the_least_recently_read_sessions_go_first_and_unnamed_histories_are_not_kept():
    one = _size([U1])
    held = HeldHistories(max_bytes=2 * one + one // 2)  # room for two one-message histories
    for session_id in ("a", "b"):
        held.loaded(session_id, None, record(session_id, "h"), [U1])
    taken = held.get("a")  # what a turn of "a" reads on from, taken before its load
    held.loaded("c", None, record("c", "h"), [U1])  # "a" is the least recently read: it goes
    assert (held.get("a"), len(held), held.size) == (None, 2, 2 * one)
    assert held.loaded("a", taken, record("a", "h"), [U1]) == [U1, U1]  # the turn's own copy still merges
    assert (held.get("b"), held.get("c"), len(held), held.size) == (None, None, 1, 2 * one)  # both read before "a"
    held.loaded("d", None, record("d", ""), [U1])  # stored before history ids: nothing to resume from
    assert held.get("d") is None
    held.forget("a")
    assert (len(held), held.size) == (0, 0)
    assert held.loaded("e", None, record("e", "h"), [U1] * 3) == [U1] * 3  # larger than the budget: not kept
    assert held.get("e") is None and held.size == 0
