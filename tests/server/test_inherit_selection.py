"""Which sessions a replica warms after a replica loss (`inherited`), without Ray: real records from a real SQLite
store, the router's real ring code (`SessionRing`) over made-up replica ids."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID

from serving.server.inherit import inherited
from serving.server.ring import SessionRing
from sessions.messages import Message
from sessions.store.base import KVReport, SessionRecord
from sessions.store.sqlite import SQLiteStore

DEPLOYMENT = DeploymentID(name="LLMServer", app_name="inherit-selection")
LOST, ME, OTHER = "lost0001", "me000002", "other003"


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "sessions.db"))
    yield store
    store.close()


def add(store, session_id: str, active: float, *, replica: str = LOST, tier: str = "device", policy: str = "pinned"):
    store.create(SessionRecord(session_id, None, {}, created_at=0.0, last_active_at=0.0, kv_policy=policy))
    turn = [Message("user", "hi"), Message("assistant", "hello")]
    store.append(session_id, turn, now=active, kv=KVReport(tier, 40, replica) if replica else None)


def ids(records: list[SessionRecord]) -> list[str]:
    return [record.session_id for record in records]


def test_the_ring_over_survivors_hands_the_lost_replicas_sessions_to_them_and_keeps_the_rest():
    before, after = SessionRing([LOST, ME, OTHER], DEPLOYMENT), SessionRing([ME, OTHER], DEPLOYMENT)
    sessions = [f"s{i}" for i in range(300)]
    for sid in sessions:
        if before.owner(sid) != LOST:
            assert after.owner(sid) == before.owner(sid), sid  # consistent hashing moves only the lost sessions
    moved = {after.owner(sid) for sid in sessions if before.owner(sid) == LOST}
    assert moved == {ME, OTHER}
    assert SessionRing([], DEPLOYMENT).owner("s1") is None


def test_selection_is_the_most_recent_inherited_sessions_bounded_and_skips_what_has_no_kv_to_warm(store):
    ring = SessionRing([ME, OTHER], DEPLOYMENT)
    mine = [sid for sid in (f"s{i}" for i in range(200)) if ring.owner(sid) == ME]
    theirs = next(sid for sid in (f"t{i}" for i in range(200)) if ring.owner(sid) == OTHER)
    a, b, c, d, e, f, g, h = mine[:8]
    add(store, a, 10.0)
    add(store, b, 30.0)
    add(store, c, 20.0)
    add(store, d, 60.0, policy="none")  # keeps no KV
    add(store, e, 50.0, tier="none")  # its KV was gone before the loss: the next turn was going to be cold anyway
    add(store, f, 40.0, replica=ME)  # its last turn ran here: nothing lost
    add(store, g, 45.0, replica=OTHER)  # on a running replica
    add(store, h, 55.0, replica="")  # never had a turn
    add(store, theirs, 70.0)  # inherited by the other survivor
    add(store, mine[8], 5.0, policy="evictable")

    def select(limit: int, done: frozenset[str] = frozenset()) -> list[str]:
        records = store.recent(limit=100)
        return ids(inherited(records, me=ME, running={ME, OTHER}, owner=ring.owner, done=done, limit=limit))

    assert select(8) == [b, c, a, mine[8]]  # most recently active first
    assert select(2) == [b, c]  # bounded
    assert select(8, done=frozenset({b})) == [c, a, mine[8]]  # warmed (or taken over) before: not again
    assert select(0) == []
