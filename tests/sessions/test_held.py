"""HeldHistories: what a process's turns keep of each session's history, bounded, merged with what a load answers."""

from __future__ import annotations

from sessions.held import HeldHistories
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
    held = HeldHistories(max_sessions=2)
    for session_id in ("a", "b"):
        held.loaded(session_id, None, record(session_id, "h"), [U1])
    taken = held.get("a")  # what a turn of "a" reads on from, taken before its load
    held.loaded("c", None, record("c", "h"), [U1])  # "a" is the least recently read: it goes
    assert (held.get("a"), len(held)) == (None, 2)
    assert held.loaded("a", taken, record("a", "h"), [A1]) == [U1, A1]  # the turn's own copy still merges
    assert held.get("b") is None  # and "a" read last, "b" went
    held.loaded("d", None, record("d", ""), [U1])  # stored before history ids: nothing to resume from
    assert held.get("d") is None
    held.forget("a")
    assert held.get("a") is None and len(held) == 1
    nothing = HeldHistories(max_sessions=0)
    assert nothing.loaded("a", None, record("a", "h"), [U1]) == [U1] and len(nothing) == 0
