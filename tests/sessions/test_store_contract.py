"""The HistoryStore contract additions (leases, list, update, KV reports, expire_idle, ping), on every backend with
real servers.
"""

from __future__ import annotations

import threading
import time

import pytest

from sessions.errors import InvalidRequest, SessionBusy, SessionExists, SessionNotFound, TooManySessions
from sessions.messages import Message
from sessions.store import UNCHANGED, KVReport
from sessions.store.base import HistoryPrefix, Lease, SessionRecord, TokenUsage
from tests.sessions.conftest import FakeClock

U1, A1 = Message("user", "u1"), Message("assistant", "a1")
U2, A2 = Message("user", "u2"), Message("assistant", "a2")
ON_DEVICE = KVReport("device", 1234, "replica-7")
ON_HOST = KVReport("host", 2048, "replica-2")


def record(session_id: str = "s1", now: float = 100.0, owner: str | None = "alice", **fields) -> SessionRecord:
    values = {"system_prompt": "Be terse.", "metadata": {"k": [1, 2]}, "last_active_at": now}
    values["history_id"] = f"history-of-{session_id}"  # fixed, so records built twice compare equal
    return SessionRecord(session_id=session_id, created_at=now, owner=owner, **(values | fields))


def mutations(store, holder):
    """Every lease-guarded mutation, as (name, call)."""
    return [
        ("append", lambda: store.append("s1", [U1], now=200.0, holder=holder)),
        ("clear", lambda: store.clear("s1", 200.0, holder=holder)),
        ("update", lambda: store.update("s1", 200.0, metadata={"x": 1}, holder=holder)),
        ("delete", lambda: store.delete("s1", holder=holder)),
    ]


# ---- leases ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [None, "turn-b"])
def test_a_lease_refuses_other_holders_mutations(store, other):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0)
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    for name, call in mutations(store, other):
        with pytest.raises(SessionBusy, match="s1"):
            call()
        assert store.messages("s1") == [U1, A1], name
    assert store.get("s1") == record(last_active_at=150.0)  # reads are never blocked
    with pytest.raises(SessionBusy):
        store.acquire_lease("s1", "turn-b", ttl_s=60)
    store.release_lease("s1", "turn-b")  # not the holder: a no-op
    with pytest.raises(SessionBusy):
        store.append("s1", [U1], now=200.0)


def test_the_holder_mutates_and_renews(store):
    store.create(record())
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    store.acquire_lease("s1", "turn-a", ttl_s=60)  # renewal by the same holder
    store.append("s1", [U1, A1], now=150.0, holder="turn-a")
    assert store.update("s1", 150.0, system_prompt=None, holder="turn-a")[0].system_prompt is None
    store.clear("s1", 150.0, holder="turn-a")
    assert store.messages("s1") == []
    history = store.get("s1").history_id  # a clear starts a new history
    store.release_lease("s1", "turn-a")
    store.acquire_lease("s1", "turn-b", ttl_s=60)  # free again
    store.release_lease("s1", "turn-b")
    store.append("s1", [U1], now=160.0)
    was = record(system_prompt=None, last_active_at=160.0, history_id=history)
    assert store.delete("s1") == was  # the record as it was


def test_lease_of_a_missing_session(store):
    with pytest.raises(SessionNotFound):
        store.acquire_lease("nope", "turn-a", ttl_s=60)
    store.release_lease("nope", "turn-a")  # nothing to release: no error
    assert store.count() == 0


@pytest.mark.parametrize(("holder", "ttl_s"), [("", 5.0), ("a", 0), ("a", -1.0), ("a", float("inf"))])
def test_lease_arguments_are_checked(store, holder, ttl_s):
    store.create(record())
    with pytest.raises(InvalidRequest):
        store.acquire_lease("s1", holder, ttl_s=ttl_s)


def test_a_lapsed_lease_frees_the_session(open_backend):
    clock = FakeClock(time.time())
    store = open_backend(clock=clock)
    store.create(record())
    store.acquire_lease("s1", "turn-a", ttl_s=10)
    clock.advance(9.9)
    with pytest.raises(SessionBusy):
        store.append("s1", [U1], now=200.0)
    clock.advance(0.2)  # the holder died without releasing: its lease lapses
    store.append("s1", [U1], now=200.0)
    store.acquire_lease("s1", "turn-b", ttl_s=10)
    with pytest.raises(SessionBusy):
        store.acquire_lease("s1", "turn-a", ttl_s=10)  # the old holder lost it
    assert store.messages("s1") == [U1]


def test_expire_idle_skips_leased_sessions(open_backend):
    clock = FakeClock(time.time())
    store = open_backend(clock=clock)
    for session_id in ("idle", "leased", "fresh"):
        store.create(record(session_id, now=10.0 if session_id != "fresh" else 500.0))
    store.acquire_lease("leased", "turn-a", ttl_s=30)
    assert store.expire_idle(100.0) == ["idle"]
    assert store.get("leased") is not None and store.count() == 2
    clock.advance(31)  # lapsed: expirable again
    assert store.expire_idle(100.0) == ["leased"]
    assert store.count() == 1


def test_expire_idle_after_release(store):
    store.create(record("s1", now=10.0))
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    assert store.expire_idle(100.0) == []
    store.release_lease("s1", "turn-a")
    assert store.expire_idle(100.0) == ["s1"]
    assert store.get("s1") is None


# ---- a turn's lease with its load and its commit --------------------------------------------------------
def test_load_with_a_lease_takes_it_and_reads_in_one_call(store):
    store.create(record())
    store.append("s1", [U1, A1, U1], now=150.0)
    loaded = store.load("s1", 2, owner="alice", lease=Lease("turn-a", 60))
    assert loaded == (record(last_active_at=150.0), [A1, U1])
    assert store.load("s1", lease=Lease("turn-a", 60))[1] == [U1, A1, U1]  # renewed by the same holder
    for name, call in mutations(store, "turn-b"):
        with pytest.raises(SessionBusy):
            call()
        assert store.messages("s1") == [U1, A1, U1], name
    with pytest.raises(SessionBusy, match="s1"):
        store.load("s1", owner="alice", lease=Lease("turn-b", 60))
    assert store.load("s1") == (loaded[0], [U1, A1, U1])  # a plain load is a read: never busy
    store.append("s1", [A1], now=160.0, holder="turn-a")


def test_load_with_a_lease_of_a_session_that_is_not_the_callers(store):
    store.create(record())
    for session_id, owner in (("nope", None), ("s1", "bob")):
        with pytest.raises(SessionNotFound):
            store.load(session_id, owner=owner, lease=Lease("turn-a", 60))
    store.acquire_lease("s1", "turn-b", ttl_s=60)
    with pytest.raises(SessionNotFound):  # leased too, but another owner must not learn even that
        store.load("s1", owner="bob", lease=Lease("turn-a", 60))
    store.release_lease("s1", "turn-b")
    store.append("s1", [U1], now=150.0, holder="someone")  # no lease was left behind by the refusals


def test_a_lapsed_lease_taken_over_by_a_load(open_backend):
    clock = FakeClock(time.time())
    store = open_backend(clock=clock)
    store.create(record())
    store.load("s1", lease=Lease("turn-a", 10))
    clock.advance(10.1)  # turn-a died
    store.load("s1", lease=Lease("turn-b", 10))
    with pytest.raises(SessionBusy):
        store.append("s1", [U1], now=200.0, holder="turn-a")
    clock.advance(9.9)
    with pytest.raises(SessionBusy):  # turn-b's lease runs from its load
        store.append("s1", [U1], now=200.0)


@pytest.mark.parametrize(("holder", "ttl_s"), [("", 5.0), ("a", 0), ("a", float("inf"))])
def test_lease_arguments_of_a_load_are_checked(store, holder, ttl_s):
    store.create(record())
    with pytest.raises(InvalidRequest):
        store.load("s1", lease=Lease(holder, ttl_s))
    store.append("s1", [U1], now=150.0, holder="someone")


def test_a_turns_load_after_a_held_prefix_reads_only_what_came_after_it(store):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0)
    first, held = store.load("s1", lease=Lease("turn-a", 60))
    store.append("s1", [U2, A2], now=160.0, holder="turn-a", release=True)  # the turn's commit
    store.append("s1", [U1], now=170.0)  # and a message appended by another route
    prefix = HistoryPrefix(first.history_id, len(held))
    loaded = store.load("s1", lease=Lease("turn-b", 60), after=prefix)
    assert loaded == (record(last_active_at=170.0), [U2, A2, U1])  # the same history: only what follows the prefix
    assert store.load("s1", lease=Lease("turn-b", 60), after=prefix._replace(length=5))[1] == []
    assert store.load("s1", lease=Lease("turn-b", 60), after=prefix._replace(length=0))[1] == [U1, A1, U2, A2, U1]
    with pytest.raises(SessionBusy):  # the lease was taken as by any leased load
        store.append("s1", [U1], now=180.0)


def test_a_turns_load_after_a_prefix_of_another_history_reads_the_whole_one(store):
    """A clear starts a new history (a new id), and so does deleting and creating the session again: a held
    prefix of the old one is not a prefix of the new, whatever its length."""
    store.create(record())
    store.append("s1", [U1, A1, U2], now=150.0)
    old = HistoryPrefix(store.get("s1").history_id, 2)
    store.clear("s1", 155.0)
    store.append("s1", [A2, U1, A1], now=160.0)
    cleared, messages = store.load("s1", lease=Lease("turn-a", 60), after=old)
    assert messages == [A2, U1, A1] and cleared.history_id not in ("", old.history_id)
    store.release_lease("s1", "turn-a")
    store.delete("s1")
    store.create(record(history_id="created-again"))
    store.append("s1", [U2, A2, U1], now=170.0)
    for prefix in (old, HistoryPrefix(cleared.history_id, 3)):
        assert store.load("s1", lease=Lease("turn-a", 60), after=prefix)[1] == [U2, A2, U1]


def test_a_session_stored_without_a_history_id_is_always_read_whole(store):
    store.create(record(history_id=""))  # as the stores read sessions written before the id existed
    store.append("s1", [U1, A1, U2], now=150.0)
    assert store.load("s1", lease=Lease("turn-a", 60), after=HistoryPrefix("", 2))[1] == [U1, A1, U2]


@pytest.mark.parametrize(
    ("window", "lease", "after"),
    [
        (None, None, HistoryPrefix("h", 1)),
        (2, Lease("t", 60), HistoryPrefix("h", 1)),
        (None, Lease("t", 60), ("h", -1)),
    ],
)
def test_a_load_after_a_prefix_is_a_turns_read(store, window, lease, after):
    """`after` goes with a lease and no window; its length is a count of messages."""
    store.create(record())
    store.append("s1", [U1], now=150.0)
    with pytest.raises(InvalidRequest):
        store.load("s1", window, lease=lease, after=HistoryPrefix(*after))
    store.append("s1", [A1], now=160.0, holder="someone")  # no lease was left behind by the refusal


def test_append_with_release_gives_the_lease_back_in_the_same_write(store):
    store.create(record())
    store.load("s1", lease=Lease("turn-a", 60))
    store.append("s1", [U1, A1], now=150.0, holder="turn-a", kv=ON_HOST, release=True)
    assert store.get("s1").kv == ON_HOST and store.messages("s1") == [U1, A1]
    store.append("s1", [U1], now=160.0)  # free: no holder needed
    store.acquire_lease("s1", "turn-b", ttl_s=60)
    with pytest.raises(SessionBusy):  # a former holder can neither write nor release another's lease
        store.append("s1", [A1], now=170.0, holder="turn-a", release=True)
    store.append("s1", [A1], now=170.0, holder="turn-b")
    assert store.messages("s1") == [U1, A1, U1, A1]


def test_append_with_release_of_a_lease_that_lapsed_or_was_never_taken(open_backend):
    clock = FakeClock(time.time())
    store = open_backend(clock=clock)
    store.create(record())
    store.append("s1", [U1], now=150.0, holder="turn-a", release=True)  # nothing held: appends, releases nothing
    store.acquire_lease("s1", "turn-b", ttl_s=10)
    clock.advance(10.1)
    store.append("s1", [A1], now=160.0, holder="turn-a", release=True)  # turn-b's lapsed: not foreign any more
    store.acquire_lease("s1", "turn-c", ttl_s=10)
    assert store.messages("s1") == [U1, A1]
    with pytest.raises(InvalidRequest, match="holder"):
        store.append("s1", [U1], now=170.0, release=True)
    assert store.messages("s1") == [U1, A1]


# ---- list ------------------------------------------------------------------------------------------------
def test_list_newest_activity_first_paged_per_owner(store):
    for i in range(7):
        store.create(record(f"a{i}", now=100.0 + i, owner="alice"))
    store.create(record("b0", now=500.0, owner="bob"))
    store.create(record("n0", now=50.0, owner=None))
    store.create(record("n1", now=50.0, owner=None))  # a tie: the larger id first
    ids = [r.session_id for r in store.list("alice", limit=50)]
    assert ids == ["a6", "a5", "a4", "a3", "a2", "a1", "a0"]
    assert [r.session_id for r in store.list("alice", limit=3)] == ["a6", "a5", "a4"]
    assert [r.session_id for r in store.list("alice", limit=3, offset=3)] == ["a3", "a2", "a1"]
    assert [r.session_id for r in store.list("alice", limit=3, offset=6)] == ["a0"]
    assert store.list("alice", offset=7) == []
    assert [r.session_id for r in store.list(None)] == ["n1", "n0"]
    assert [r.session_id for r in store.list("bob")] == ["b0"]
    assert store.list("carol") == []
    assert store.list("alice", limit=1)[0] == record("a6", now=106.0, owner="alice")
    store.append("a0", [U1], now=900.0)  # activity moves it to the front
    store.delete("a6")
    assert [r.session_id for r in store.list("alice", limit=2)] == ["a0", "a5"]


def test_recent_lists_every_owners_sessions_newest_activity_first(store):
    store.create(record("a0", now=100.0, owner="alice"))
    store.create(record("b0", now=300.0, owner="bob"))
    store.create(record("n0", now=200.0, owner=None))
    store.create(record("a1", now=200.0, owner="alice"))  # a tie with n0: the larger id first
    assert [r.session_id for r in store.recent()] == ["b0", "n0", "a1", "a0"]
    assert [r.session_id for r in store.recent(limit=2, offset=1)] == ["n0", "a1"]
    assert store.recent(offset=4) == []
    store.append("a0", [U1], now=900.0, kv=ON_DEVICE)
    store.delete("b0")
    first = store.recent(limit=1)[0]
    assert (first.session_id, first.kv) == ("a0", ON_DEVICE)
    assert [r.session_id for r in store.recent()] == ["a0", "n0", "a1"]


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (1001, 0), (-1, 0), (10, -1), (True, 0), (10, 1.5), ("5", 0)])
def test_list_checks_paging(store, limit, offset):
    with pytest.raises(InvalidRequest, match=r"limit|offset"):
        store.list("alice", limit=limit, offset=offset)
    with pytest.raises(InvalidRequest, match=r"limit|offset"):
        store.recent(limit=limit, offset=offset)


def test_list_accepts_the_bounds(store):
    store.create(record())
    assert len(store.list("alice", limit=1000)) == 1
    assert len(store.list("alice", limit=1, offset=0)) == 1
    for offset in (2**52, 2**53 + 1, 2**63, 2**80):  # past the end, however far: an empty page, not an integer overflow
        assert store.list("alice", limit=1000, offset=offset) == []


# ---- update ----------------------------------------------------------------------------------------------
def test_update_prompt_and_metadata(store):
    store.create(record())
    store.append("s1", [U1], now=150.0)
    updated, _ = store.update("s1", 160.0, system_prompt="Be verbose.")
    assert updated == record(system_prompt="Be verbose.", last_active_at=160.0)  # an edit is activity
    assert store.get("s1") == updated
    updated, _ = store.update("s1", 170.0, metadata={"lang": "fr", "n": [1, {"x": None}]})
    assert updated.system_prompt == "Be verbose." and updated.metadata == {"lang": "fr", "n": [1, {"x": None}]}
    updated, _ = store.update("s1", 180.0, system_prompt=None, metadata={})
    assert (updated.system_prompt, updated.metadata) == (None, {})
    assert store.update("s1", 180.0, system_prompt=UNCHANGED) == (updated, None)  # nothing to change
    assert store.get("s1") == updated
    assert store.messages("s1") == [U1]  # history untouched
    updated.metadata["mutated"] = True
    assert store.get("s1").metadata == {}


def test_update_missing_session(store):
    with pytest.raises(SessionNotFound):
        store.update("nope", 150.0, system_prompt="x")


# ---- KV reports ------------------------------------------------------------------------------------------
def test_a_new_session_has_no_kv_report(store):
    store.create(record())
    assert store.get("s1").kv == KVReport() == KVReport("none", 0, "")
    store.append("s1", [U1], now=150.0)
    assert store.get("s1").kv == KVReport()


def test_the_kv_report_round_trips_through_append_get_and_list(store):
    store.create(record())
    store.create(record("s2", now=90.0))
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    assert store.get("s1") == record(last_active_at=150.0, kv=ON_DEVICE)
    assert store.messages("s1") == [U1, A1]
    assert [(r.session_id, r.kv) for r in store.list("alice")] == [("s1", ON_DEVICE), ("s2", KVReport())]
    store.append("s2", [U1], now=160.0, kv=ON_HOST)
    assert [(r.session_id, r.kv) for r in store.list("alice")] == [("s2", ON_HOST), ("s1", ON_DEVICE)]
    store.append("s1", [U1], now=170.0, kv=KVReport("none", 0, "replica-7"))  # evicted: reported as such
    assert store.get("s1").kv == KVReport("none", 0, "replica-7")
    store.append("s1", [A1], now=180.0, kv=KVReport())
    assert store.get("s1").kv == KVReport()
    assert store.messages("s1") == [U1, A1, U1, A1]


def test_the_kv_reports_token_usage_persists_with_each_turn_and_resets_with_the_history(store):
    store.create(record())
    first = KVReport("device", 40, "replica-7", TokenUsage(prompt=30, recomputed=30, completion=11, context=41))
    store.append("s1", [U1, A1], now=150.0, kv=first)
    assert store.get("s1").kv == first
    second = KVReport("host", 90, "replica-7", TokenUsage(70, 40, 1, 22, 81))
    store.append("s1", [U1, A1], now=160.0, kv=second)
    assert store.get("s1").kv.usage == TokenUsage(70, 40, 1, 22, 81)
    assert store.list("alice")[0].kv == second
    assert store.clear("s1", 170.0) == second  # what it reset
    assert store.get("s1").kv == KVReport()  # a new history starts its accounting afresh


@pytest.mark.parametrize("policy", ["pinned", "evictable", "none"])
def test_the_kv_policy_is_stored_with_the_record_and_survives_history_edits(store, policy):
    store.create(record(kv_policy=policy))
    assert store.get("s1").kv_policy == policy
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    store.clear("s1", 160.0)
    store.update("s1", 170.0, system_prompt="Be verbose.")
    assert store.get("s1").kv_policy == policy
    assert store.list("alice")[0].kv_policy == policy


def test_a_record_refuses_an_unknown_kv_policy():
    with pytest.raises(ValueError, match="kv_policy must be one of pinned, evictable, none"):
        record(kv_policy="sticky")


def test_create_stores_the_records_kv_report(store):
    store.create(record(kv=ON_HOST))
    assert store.get("s1") == record(kv=ON_HOST)
    assert store.list("alice") == [record(kv=ON_HOST)]


def test_append_without_a_kv_report_keeps_the_last_one(store):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    store.append("s1", [U1], now=160.0)
    store.append("s1", [A1], now=170.0, kv=None)
    assert store.get("s1") == record(last_active_at=170.0, kv=ON_DEVICE)
    store.touch("s1", 180.0)
    assert store.get("s1").kv == ON_DEVICE


def test_a_refused_append_sets_no_kv_report(store):
    store.create(record())
    store.append("s1", [U1], now=150.0, kv=ON_DEVICE)
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    with pytest.raises(SessionBusy):
        store.append("s1", [A1], now=160.0, kv=ON_HOST)
    with pytest.raises(TypeError):
        store.append("s1", [A1, "not parsed"], now=160.0, holder="turn-a", kv=ON_HOST)  # type: ignore[list-item]
    assert store.get("s1") == record(last_active_at=150.0, kv=ON_DEVICE)
    assert store.messages("s1") == [U1]
    store.append("s1", [A1], now=170.0, holder="turn-a", kv=ON_HOST)  # the lease's own turn reports
    assert store.get("s1").kv == ON_HOST
    with pytest.raises(SessionNotFound):
        store.append("nope", [U1], now=1.0, kv=ON_HOST)


# ---- delete for an owner ----------------------------------------------------------------------------------
@pytest.mark.parametrize("owner", ["bob", ""])
def test_delete_for_another_owner_leaves_the_session_alone(store, owner):
    store.create(record(kv=ON_HOST))
    store.create(record("nobodys", owner=None))
    store.append("s1", [U1], now=150.0)
    store.acquire_lease("s1", "turn-a", ttl_s=60)  # busy too, but another owner must not learn even that
    assert store.delete("s1", owner=owner) is None
    assert store.delete("nobodys", owner=owner) is None and store.delete("missing", owner=owner) is None
    assert store.messages("s1") == [U1] and store.count() == 2
    with pytest.raises(SessionBusy):
        store.delete("s1", owner="alice")
    assert store.delete("s1", owner="alice", holder="turn-a") == record(last_active_at=150.0, kv=ON_HOST)
    assert store.get("s1") is None and store.count() == 1


# ---- load: a session's record and history in one call ----------------------------------------------------
def test_load_returns_the_record_and_the_last_window_of_messages(store):
    store.create(record())
    store.append("s1", [U1, A1, U1], now=150.0, kv=ON_DEVICE)
    expected = record(last_active_at=150.0, kv=ON_DEVICE)
    assert store.load("s1") == (expected, [U1, A1, U1])
    assert store.load("s1", 2, owner="alice") == (expected, [A1, U1])
    assert store.load("s1", 10**30) == (expected, [U1, A1, U1])
    store.create(record("empty", owner=None))
    assert store.load("empty") == (record("empty", owner=None), [])


@pytest.mark.parametrize("owner", ["bob", ""])
def test_load_for_another_owner_is_not_found(store, owner):
    store.create(record())
    store.create(record("nobodys", owner=None))
    for session_id in ("s1", "nobodys", "missing"):
        with pytest.raises(SessionNotFound, match=session_id):
            store.load(session_id, owner=owner)


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_load_checks_the_window(store, window):
    store.create(record())
    with pytest.raises(InvalidRequest, match="window"):
        store.load("s1", window)


# ---- append for an owner: the append route's one call ----------------------------------------------------
def test_append_for_its_owner_or_any_caller_keeps_the_kv_report(store):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    u2 = Message("user", "u2 \u00e9\U0001f600")
    store.append("s1", [u2], now=160.0, owner="alice")
    store.append("s1", [A1], now=170.0)  # no owner given: any caller
    assert store.messages("s1") == [U1, A1, u2, A1]
    assert store.get("s1") == record(last_active_at=170.0, kv=ON_DEVICE)  # history only grew: the KV still matches


@pytest.mark.parametrize("owner", ["bob", ""])
def test_append_for_another_owner_is_not_found_and_writes_nothing(store, owner):
    store.create(record())
    store.create(record("nobodys", owner=None))
    store.append("s1", [U1], now=150.0)
    store.acquire_lease("s1", "turn-a", ttl_s=60)  # busy too, but another owner must not learn even that
    for session_id in ("s1", "nobodys", "missing"):
        with pytest.raises(SessionNotFound, match=session_id):
            store.append(session_id, [A1], now=160.0, owner=owner)
    assert store.messages("s1") == [U1] and store.messages("nobodys") == []
    assert store.get("s1").last_active_at == 150.0


def test_append_for_an_owner_honours_the_lease(store):
    store.create(record())
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    with pytest.raises(SessionBusy, match="s1"):
        store.append("s1", [U1], now=160.0, owner="alice")
    assert store.messages("s1") == []
    store.append("s1", [U1], now=170.0, holder="turn-a", owner="alice")
    with pytest.raises(TypeError):
        store.append("s1", [A1, "not parsed"], now=180.0, holder="turn-a", owner="alice")  # type: ignore[list-item]
    assert store.messages("s1") == [U1]


def test_clear_resets_the_kv_report_and_answers_what_it_reset(store):
    store.create(record())
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    assert store.clear("s1", 155.0) == ON_DEVICE
    cleared = store.get("s1")
    assert cleared == record(last_active_at=155.0, history_id=cleared.history_id)
    assert store.clear("s1", 156.0) == KVReport()  # nothing reported: nothing to free
    store.append("s1", [U1], now=160.0, kv=ON_HOST)
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    history = store.get("s1").history_id
    with pytest.raises(SessionBusy):
        store.clear("s1", 170.0)
    refused = record(last_active_at=160.0, kv=ON_HOST, history_id=history)
    assert store.get("s1") == refused  # a refused clear changes nothing
    assert store.messages("s1") == [U1]
    assert store.clear("s1", 170.0, holder="turn-a") == ON_HOST
    assert store.get("s1").kv == KVReport() and store.messages("s1") == []


@pytest.mark.parametrize("leased", [False, True])
def test_clear_and_update_for_an_owner_see_only_their_sessions(store, leased):
    store.create(record())  # alice's
    store.append("s1", [U1, A1], now=150.0, kv=ON_DEVICE)
    if leased:  # another owner learns nothing from a lease either: not found, not busy
        store.acquire_lease("s1", "turn-a", ttl_s=60)
    for other in ("bob", ""):
        with pytest.raises(SessionNotFound):
            store.clear("s1", 160.0, owner=other)
        with pytest.raises(SessionNotFound):
            store.update("s1", 160.0, system_prompt="hijack", owner=other)
    with pytest.raises(SessionNotFound):
        store.clear("nope", 160.0, owner="alice")
    assert store.get("s1") == record(last_active_at=150.0, kv=ON_DEVICE) and store.messages("s1") == [U1, A1]
    holder = "turn-a" if leased else None
    updated, freed = store.update("s1", 170.0, metadata={"t": 1}, holder=holder, owner="alice")
    assert (updated.metadata, updated.last_active_at, freed) == ({"t": 1}, 170.0, None)
    assert store.clear("s1", 180.0, holder=holder, owner="alice") == ON_DEVICE
    assert store.messages("s1") == [] and store.get("s1").last_active_at == 180.0


@pytest.mark.parametrize(
    ("before", "after"), [("Be terse.", "Be verbose."), ("Be terse.", None), (None, "Be terse."), ("Be terse.", "")]
)
def test_a_new_system_prompt_resets_the_kv_report(store, before, after):
    store.create(record(system_prompt=before))
    store.append("s1", [U1], now=150.0, kv=ON_DEVICE)
    updated, freed = store.update("s1", 160.0, system_prompt=after)
    assert updated == record(system_prompt=after, last_active_at=160.0) == store.get("s1")
    assert freed == ON_DEVICE  # the report it reset: what to free
    assert store.messages("s1") == [U1]
    assert store.update("s1", 170.0, system_prompt="another")[1] == KVReport()  # a change with nothing reported


@pytest.mark.parametrize("prompt", ["Be terse.", None])
def test_an_update_that_keeps_the_system_prompt_keeps_the_kv_report(store, prompt):
    store.create(record(system_prompt=prompt))
    store.append("s1", [U1], now=150.0, kv=ON_DEVICE)
    for update in (
        {"system_prompt": prompt},  # the same prompt again
        {"metadata": {"lang": "fr"}},
        {"system_prompt": UNCHANGED, "metadata": {}},
    ):
        updated, freed = store.update("s1", 160.0, **update)
        assert (updated.kv, freed) == (ON_DEVICE, None), update
    assert store.get("s1") == record(system_prompt=prompt, metadata={}, last_active_at=160.0, kv=ON_DEVICE)


def test_a_refused_update_keeps_the_kv_report(store):
    store.create(record())
    store.append("s1", [U1], now=150.0, kv=ON_DEVICE)
    store.acquire_lease("s1", "turn-a", ttl_s=60)
    with pytest.raises(SessionBusy):
        store.update("s1", 160.0, system_prompt="Be verbose.")
    assert store.get("s1") == record(last_active_at=150.0, kv=ON_DEVICE)


# ---- ping and concurrency --------------------------------------------------------------------------------
def test_ping(store):
    store.ping()


def test_concurrent_appends_from_two_store_objects_keep_every_message_once_in_order(backend, open_backend):
    """Two store objects (two pools/connections for the network stores), three threads each, appending at once;
    half of them for the session's owner (the append route's call), the others as a turn's commit does."""
    stores = [open_backend(), open_backend()]
    stores[0].create(record())
    start = threading.Barrier(6)

    def writer(store, name: str) -> None:
        start.wait()
        for i in range(15):
            batch = [Message("user", f"{name}:{i}"), Message("assistant", f"{name}:{i}")]
            store.append("s1", batch, now=float(i), owner="alice" if int(name[1:]) % 2 else None)

    threads = [threading.Thread(target=writer, args=(stores[n % 2], f"w{n}")) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = stores[1].messages("s1")
    assert len(history) == 180 and len(stores[0].messages("s1")) == 180
    pairs = list(zip(history[::2], history[1::2], strict=True))
    assert all(u.role == "user" and a.role == "assistant" and u.content == a.content for u, a in pairs)
    for n in range(6):  # each writer's turns in the order it wrote them, none lost or doubled
        assert [u.content for u, _ in pairs if u.content.startswith(f"w{n}:")] == [f"w{n}:{i}" for i in range(15)]
    assert stores[0].messages("s1", window=8) == history[-8:]


# ---- the session limit -----------------------------------------------------------------------------------
def test_create_with_a_limit_refuses_once_the_store_holds_that_many(store):
    store.create(record("s1"), limit=2)
    store.create(record("s2"), limit=2)
    with pytest.raises(SessionExists):  # a taken id is SessionExists even when the store is full
        store.create(record("s1"), limit=2)
    with pytest.raises(TooManySessions, match="2 sessions"):
        store.create(record("s3"), limit=2)
    assert store.get("s3") is None and store.count() == 2
    store.create(record("s3"))  # no limit: always room
    assert store.delete("s1") and store.delete("s2")
    store.create(record("s4"), limit=2)
    assert store.count() == 2


def test_racing_creates_from_two_store_objects_never_exceed_the_limit(open_backend):
    """The count and the insert are one atomic step across processes (two store objects: two pools/connections)."""
    stores = [open_backend(), open_backend()]
    start = threading.Barrier(6)
    created: list[str] = []

    def creator(store, name: str) -> None:
        start.wait()
        for i in range(8):
            try:
                store.create(record(f"{name}-{i}"), limit=10)
                created.append(f"{name}-{i}")
            except TooManySessions:
                pass

    threads = [threading.Thread(target=creator, args=(stores[n % 2], f"c{n}")) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) <= 10 and stores[1].count() == len(created)
    assert all(stores[0].get(session_id) is not None for session_id in created)
    for i in range(10 - len(created)):  # creates racing at the limit may all step back; one at a time, it fills up
        stores[i % 2].create(record(f"late-{i}"), limit=10)
    with pytest.raises(TooManySessions):
        stores[0].create(record("one-too-many"), limit=10)
    assert stores[1].count() == 10


def test_count_stays_exact_while_two_store_objects_create_and_delete_at_once(open_backend):
    """PostgreSQL keeps the count in trigger-maintained stripes rather than counting rows: no create, delete or
    idle-expiry sweep racing with others may be lost from it."""
    stores = [open_backend(), open_backend()]
    start = threading.Barrier(4)

    def churn(store, name: str) -> None:
        start.wait()
        for i in range(12):
            store.create(record(f"{name}-{i}", now=float(i)))
            if i % 3 == 0:
                store.delete(f"{name}-{i}")
        store.expire_idle(before=4.0)  # two sweeps at once, each deleting several sessions

    threads = [threading.Thread(target=churn, args=(stores[n % 2], f"c{n}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    left = [f"c{n}-{i}" for n in range(4) for i in range(4, 12) if i % 3]
    assert stores[0].missing(left) == [] and len(stores[1].recent(limit=100)) == len(left)
    assert stores[0].count() == stores[1].count() == len(left)


def test_only_one_of_many_racing_holders_gets_the_lease(open_backend):
    stores = [open_backend(), open_backend()]
    stores[0].create(record())
    start = threading.Barrier(8)
    won: list[str] = []

    def contender(n: int) -> None:
        start.wait()
        try:
            stores[n % 2].acquire_lease("s1", f"turn-{n}", ttl_s=60)
            won.append(f"turn-{n}")
        except SessionBusy:
            pass

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    stores[1].append("s1", [U1], now=1.0, holder=won[0])
    with pytest.raises(SessionBusy):
        stores[0].append("s1", [U1], now=1.0)
