from __future__ import annotations

import asyncio
import re
import time

import pytest

from sessions.errors import InvalidRequest, SessionBusy, SessionExists, SessionNotFound, TooManySessions
from sessions.manager import SessionManager
from sessions.messages import Message
from sessions.store import KVReport
from tests.sessions.conftest import RecordingEngine

U1, A1, U2, A2 = Message("user", "u1"), Message("assistant", "a1"), Message("user", "u2"), Message("assistant", "a2")


@pytest.fixture
def manager(store, engine, clock) -> SessionManager:
    return SessionManager(store, engine, max_sessions=3, idle_ttl_s=60, clock=clock)


def snapshot(manager: SessionManager) -> dict:
    """Everything the store holds, to prove a refused request changed nothing."""
    ids = [r.session_id for owner in (None, "alice", "bob") for r in manager.store.list(owner, limit=1000)]
    return {i: (manager.store.get(i), manager.store.messages(i)) for i in ids}


# ---- create ------------------------------------------------------------------------------------------
def test_create_with_everything(manager, clock):
    record = manager.create(
        "chat-1",
        system_prompt="Be terse.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}, A1],
        metadata={"lang": "en"},
        owner="alice",
    )
    assert record.session_id == "chat-1"
    assert manager.get("chat-1") == record
    assert (record.created_at, record.last_active_at) == (clock.now, clock.now)
    assert manager.history("chat-1") == [Message("user", "hi"), A1]
    assert manager.get("chat-1").system_prompt == "Be terse."
    assert manager.get("chat-1").metadata == {"lang": "en"}


def test_create_picks_a_uuid4_hex_id(manager):
    first, second = manager.create(), manager.create()
    assert re.fullmatch(r"[0-9a-f]{32}", first.session_id)
    assert first.session_id != second.session_id


@pytest.mark.parametrize("session_id", ["", "a" * 129, "has space", "slash/id", "ümlaut", "x\n", 42])
def test_create_refuses_bad_ids(manager, session_id):
    with pytest.raises(InvalidRequest, match="session id"):
        manager.create(session_id)
    assert manager.count() == 0


def test_create_accepts_every_allowed_character(manager):
    session_id = "Az09._:-" + "x" * 120
    assert manager.create(session_id).session_id == session_id


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"messages": [U1, {"role": "robot", "content": "x"}]}, r"messages\[1\]"),
        ({"messages": [{"role": "system", "content": "sneaky"}]}, "system_prompt"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text-only"),
        ({"metadata": ["not", "a", "dict"]}, "metadata"),
        ({"metadata": {"when": object()}}, "JSON"),
        ({"system_prompt": 7}, "system_prompt"),
    ],
)
def test_create_validates_everything_before_storing(manager, kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        manager.create("s1", **kwargs)
    assert manager.count() == 0
    assert manager.store.get("s1") is None


def test_create_existing_id_is_409_and_keeps_the_original(manager):
    manager.create("s1", system_prompt="original", messages=[U1])
    before = snapshot(manager)
    with pytest.raises(SessionExists):
        manager.create("s1", system_prompt="replacement", messages=[U2, A2])
    assert snapshot(manager) == before


def test_too_many_sessions(manager, clock):
    for i in range(3):
        manager.create(f"s{i}")
    before = snapshot(manager)
    with pytest.raises(TooManySessions, match="max_sessions"):
        manager.create("s3")
    assert snapshot(manager) == before


def test_full_server_expires_idle_sessions_to_make_room(manager, clock, engine):
    manager.create("old")
    clock.advance(61)
    manager.create("a")
    manager.create("b")
    manager.create("c")  # at the limit: "old" has been idle longer than the TTL and makes room
    assert manager.store.get("old") is None
    assert engine.released == ["old"]
    assert manager.count() == 3


# ---- get / owner -------------------------------------------------------------------------------------
def test_missing_session_is_404_everywhere(manager):
    for call in (
        lambda: manager.get("nope"),
        lambda: manager.destroy("nope"),
        lambda: manager.history("nope"),
        lambda: manager.append("nope", [U1]),
        lambda: manager.clear("nope"),
        lambda: manager.commit_turn("nope", [U1], A1),
    ):
        with pytest.raises(SessionNotFound, match="nope"):
            call()
    assert manager.count() == 0


def test_owner_isolation_does_not_leak_existence(manager, engine):
    manager.create("mine", owner="alice", messages=[U1])
    before = snapshot(manager)
    for call in (
        lambda: manager.get("mine", owner="bob"),
        lambda: manager.history("mine", owner="bob"),
        lambda: manager.append("mine", [U2], owner="bob"),
        lambda: manager.clear("mine", owner="bob"),
        lambda: manager.destroy("mine", owner="bob"),
    ):
        with pytest.raises(SessionNotFound) as caught:
            call()
        with pytest.raises(SessionNotFound) as missing:
            manager.get("absent", owner="bob")
        assert str(caught.value).replace("mine", "X") == str(missing.value).replace("absent", "X")
    assert snapshot(manager) == before
    assert engine.released == []
    assert manager.get("mine", owner="alice").owner == "alice"
    assert manager.get("mine").owner == "alice"  # no owner given: trusted internal caller


# ---- history, append, clear, destroy -------------------------------------------------------------------
def test_history_window(manager):
    manager.create("s1", messages=[U1, A1, U2, A2])
    assert manager.history("s1", window=3) == [A1, U2, A2]
    assert manager.history("s1") == [U1, A1, U2, A2]
    assert len(manager.history("s1")) == 4


@pytest.mark.parametrize("window", [0, -1, 1.5, "2", True])
def test_history_window_must_be_positive(manager, window):
    manager.create("s1", messages=[U1])
    with pytest.raises(InvalidRequest, match="window"):
        manager.history("s1", window=window)


def test_append_validates_all_first_and_keeps_kv(manager, engine, clock):
    manager.create("s1", messages=[U1])
    before = snapshot(manager)
    clock.advance(5)
    with pytest.raises(InvalidRequest, match=r"messages\[1\]"):
        manager.append("s1", [A1, {"role": "user", "content": None}, U2])
    with pytest.raises(InvalidRequest, match="system_prompt"):
        manager.append("s1", [{"role": "system", "content": "new rules"}])
    with pytest.raises(InvalidRequest, match="empty"):
        manager.append("s1", [])
    assert snapshot(manager) == before
    manager.append("s1", [A1, {"role": "user", "content": [{"type": "text", "value": "u2"}]}])
    assert manager.history("s1") == [U1, A1, U2]
    assert manager.get("s1").last_active_at == clock.now
    assert engine.released == []  # history only grew: the KV prefix is still valid


def test_clear_keeps_system_prompt_and_releases_kv(manager, engine):
    manager.create("s1", system_prompt="Be terse.", messages=[U1, A1])
    manager.clear("s1")
    assert manager.history("s1") == []
    assert manager.get("s1").system_prompt == "Be terse."
    assert engine.released == ["s1"]


def test_destroy_deletes_and_releases_kv(manager, engine):
    manager.create("s1", messages=[U1, A1])
    manager.destroy("s1")
    assert manager.store.get("s1") is None
    assert engine.released == ["s1"]
    with pytest.raises(SessionNotFound):
        manager.destroy("s1")
    assert engine.released == ["s1"]


def test_engine_release_failure_does_not_undo_destroy(store, clock):
    class BrokenEngine:
        def release(self, cache_key: str) -> None:
            raise RuntimeError("engine down")

    manager = SessionManager(store, BrokenEngine(), clock=clock)
    manager.create("s1")
    manager.destroy("s1")
    assert manager.count() == 0


def test_works_without_an_engine(store, clock):
    manager = SessionManager(store, None, clock=clock)
    manager.create("s1", messages=[U1])
    manager.clear("s1")
    manager.destroy("s1")
    assert manager.count() == 0


# ---- turns ---------------------------------------------------------------------------------------------
def test_commit_turn_stores_prompt_and_reply_together(manager, clock):
    manager.create("s1")
    clock.advance(3)
    manager.commit_turn("s1", [U1], A1)
    assert manager.history("s1") == [U1, A1]
    assert manager.get("s1").last_active_at == clock.now


async def test_commit_turn_stores_the_replicas_kv_report_with_the_turn(manager, other_replica, engine):
    manager.create("s1", system_prompt="Be terse.", owner="alice")
    async with manager.turn("s1") as turn:
        manager.commit_turn("s1", [U1], A1, holder=turn.lease.holder, kv=KVReport("device", 42, "replica-1"))
    seen = other_replica.get("s1")  # the ingress reads it from the store, not from the replica
    assert seen.kv == KVReport("device", 42, "replica-1")
    assert [r.kv for r in other_replica.list_sessions("alice")] == [seen.kv]
    manager.commit_turn("s1", [U2], A2)  # no report: the last one stands
    assert manager.get("s1").kv == seen.kv
    manager.update("s1", metadata={"x": 1})
    assert manager.get("s1").kv == seen.kv
    manager.update("s1", system_prompt="Be verbose.")
    assert manager.get("s1").kv == KVReport() and engine.released == ["s1"]
    manager.commit_turn("s1", [U1], A1, kv=KVReport("host", 80, "replica-1"))
    manager.clear("s1")
    assert manager.get("s1").kv == KVReport() and engine.released == ["s1", "s1"]


def test_commit_turn_refuses_a_non_assistant_reply(manager):
    manager.create("s1", messages=[U1, A1])
    with pytest.raises(InvalidRequest, match="assistant"):
        manager.commit_turn("s1", [U2], Message("user", "not a reply"))
    assert manager.history("s1") == [U1, A1]


async def test_turns_of_one_session_are_strictly_ordered(manager):
    manager.create("s1")
    events: list[str] = []

    async def turn(n: int) -> None:
        async with manager.turn("s1"):
            events.append(f"start{n}")
            await asyncio.sleep(0.01 if n == 0 else 0)  # the first turn is slowest: others must still wait
            await asyncio.sleep(0)
            manager.commit_turn("s1", [Message("user", f"q{n}")], Message("assistant", f"r{n}"))
            events.append(f"end{n}")

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(turn(n)))
        await asyncio.sleep(0)  # fix the arrival order
    await asyncio.gather(*tasks)
    assert events == [e for n in range(5) for e in (f"start{n}", f"end{n}")]
    assert [m.content for m in manager.history("s1")] == [x for n in range(5) for x in (f"q{n}", f"r{n}")]
    assert manager._turn_locks == {}  # idle locks do not accumulate


async def test_turns_of_different_sessions_overlap(manager):
    manager.create("a")
    manager.create("b")
    both_inside = asyncio.Event()
    inside = set()

    async def turn(session_id: str) -> None:
        async with manager.turn(session_id):
            inside.add(session_id)
            if len(inside) == 2:
                both_inside.set()
            await asyncio.wait_for(both_inside.wait(), timeout=1)

    await asyncio.gather(turn("a"), turn("b"))


async def test_turn_without_waiting_reports_busy(manager):
    manager.create("s1")
    async with manager.turn("s1"):
        with pytest.raises(SessionBusy, match="already running"):
            async with manager.turn("s1", wait=False):
                pass
    async with manager.turn("s1", wait=False):  # free again
        pass


async def test_failed_turn_stores_nothing_and_frees_the_lock(manager):
    manager.create("s1", messages=[U1, A1])
    with pytest.raises(RuntimeError):
        async with manager.turn("s1"):
            raise RuntimeError("generation failed before commit_turn")
    assert manager.history("s1") == [U1, A1]
    async with manager.turn("s1", wait=False):
        pass


async def test_destroy_removes_the_lock(manager):
    manager.create("s1")
    async with manager.turn("s1"):
        assert "s1" in manager._turn_locks
        manager.destroy("s1")
        assert "s1" not in manager._turn_locks


# ---- expiry ----------------------------------------------------------------------------------------------
def test_expire_idle_with_a_fake_clock(manager, clock, engine):
    manager.create("quiet")
    manager.create("chatty")
    clock.advance(50)
    manager.append("chatty", [U1])
    assert manager.expire_idle() == []
    clock.advance(11)  # quiet: idle 61 s > 60; chatty: idle 11 s
    assert manager.expire_idle() == ["quiet"]
    assert engine.released == ["quiet"]
    assert manager.store.get("quiet") is None
    assert manager.history("chatty") == [U1]
    clock.advance(49)  # chatty: idle exactly 60 s
    assert manager.expire_idle() == []  # exactly the TTL is not yet idle *longer* than it
    clock.advance(0.5)
    assert manager.expire_idle() == ["chatty"]
    assert manager.count() == 0


async def test_expire_idle_spares_a_session_in_a_turn(manager, clock):
    manager.create("busy")
    clock.advance(120)
    async with manager.turn("busy"):
        assert manager.expire_idle() == []
    assert manager.expire_idle() == ["busy"]


def test_expiry_frees_kv_of_sessions_another_replica_deleted(manager, store, clock, engine):
    """Two replicas share the store; the KV lives on the one that ran the turns, either may delete the record."""
    from tests.sessions.conftest import RecordingEngine

    manager.create("mine")
    manager.create("gone")
    engine.held |= {"mine", "gone"}  # this replica ran both sessions' turns
    other_engine = RecordingEngine()
    other_replica = SessionManager(store, other_engine, clock=clock)
    other_replica.destroy("gone")
    assert other_engine.released == ["gone"] and engine.held == {"mine", "gone"}  # the owner does not know yet

    assert manager.expire_idle() == []  # the janitor's sweep: nothing idle, but one orphan
    assert engine.released == ["gone"] and engine.held == {"mine"}
    assert manager.history("mine") == []


async def test_orphan_sweep_spares_a_key_in_a_turn(manager, clock, engine):
    manager.create("s1")
    engine.held.add("s1")
    async with manager.turn("s1") as turn:
        manager.store.delete("s1", holder=turn.lease.holder)  # deleted while this replica is mid-turn (lease lapsed)
        assert manager.release_orphans() == []
    assert manager.release_orphans() == ["s1"]


def test_limits_must_be_sane(store):
    with pytest.raises(ValueError, match="max_sessions"):
        SessionManager(store, max_sessions=0)
    with pytest.raises(ValueError, match="idle_ttl_s"):
        SessionManager(store, idle_ttl_s=0)


def test_lease_ttl_must_be_sane(store):
    with pytest.raises(ValueError, match="lease_ttl_s"):
        SessionManager(store, lease_ttl_s=0)


# ---- list and update -------------------------------------------------------------------------------------
def test_list_sessions_per_owner_newest_first(manager, clock):
    manager.max_sessions = 10
    for name in ("a", "b", "c"):
        manager.create(name, owner="alice")
        clock.advance(1)
    manager.create("anon")
    manager.append("a", [U1])
    assert [r.session_id for r in manager.list_sessions("alice")] == ["a", "c", "b"]
    assert [r.session_id for r in manager.list_sessions("alice", limit=2, offset=1)] == ["c", "b"]
    assert [r.session_id for r in manager.list_sessions(None)] == ["anon"]
    assert manager.list_sessions("bob") == []
    for limit, offset in ((0, 0), (1001, 0), (5, -1)):
        with pytest.raises(InvalidRequest):
            manager.list_sessions("alice", limit=limit, offset=offset)


def test_update_validates_checks_the_owner_and_frees_kv_on_a_new_prompt(manager, engine, clock):
    manager.create("s1", system_prompt="Be terse.", messages=[U1, A1], metadata={"v": 1}, owner="alice")
    before = snapshot(manager)
    for kwargs, error in (
        ({"system_prompt": 7}, InvalidRequest),
        ({"metadata": ["x"]}, InvalidRequest),
        ({"metadata": {"bad": object()}}, InvalidRequest),
    ):
        with pytest.raises(error):
            manager.update("s1", "alice", **kwargs)
    with pytest.raises(SessionNotFound):
        manager.update("s1", "bob", system_prompt="hijack")
    with pytest.raises(SessionNotFound):
        manager.update("nope", system_prompt="x")
    assert snapshot(manager) == before and engine.released == []

    clock.advance(5)
    record = manager.update("s1", "alice", metadata={"v": 2})
    assert (record.system_prompt, record.metadata) == ("Be terse.", {"v": 2})
    assert engine.released == []  # the prompt did not change: the KV still matches
    assert manager.get("s1").last_active_at == clock.now
    record = manager.update("s1", "alice", system_prompt="Be verbose.")
    assert manager.get("s1").system_prompt == "Be verbose." and record.metadata == {"v": 2}
    assert engine.released == ["s1"]
    manager.update("s1", system_prompt=None)
    assert manager.get("s1").system_prompt is None and engine.released == ["s1", "s1"]
    assert manager.history("s1") == [U1, A1]


# ---- the store lease of a turn ---------------------------------------------------------------------------
@pytest.fixture
def other_replica(open_backend, clock) -> SessionManager:
    """Another process sharing the store (for memory: the same store object)."""
    return SessionManager(open_backend(), None, clock=clock)


async def test_a_turn_holds_the_store_lease_against_other_processes(manager, other_replica):
    manager.create("s1", messages=[U1, A1])
    async with manager.turn("s1") as turn:
        assert isinstance(turn.lease.holder, str) and turn.lease.holder
        for call in (
            lambda: other_replica.append("s1", [U2]),
            lambda: other_replica.clear("s1"),
            lambda: other_replica.destroy("s1"),
            lambda: other_replica.update("s1", metadata={"x": 1}),
        ):
            with pytest.raises(SessionBusy):
                call()
        with pytest.raises(SessionBusy):
            async with other_replica.turn("s1"):
                pass
        assert other_replica.history("s1") == [U1, A1]  # reads are fine
        manager.append("s1", [U2])  # this process's own edits act as its turn
        manager.commit_turn("s1", [], A2)
    assert manager.history("s1") == [U1, A1, U2, A2]
    other_replica.append("s1", [U1])  # the turn is over: the lease is released
    other_replica.destroy("s1")


async def test_commit_turn_with_the_yielded_holder(manager, other_replica):
    manager.create("s1")
    async with manager.turn("s1") as turn:
        manager.store.append("s1", [U1], 0.0, holder=turn.lease.holder)
        manager.commit_turn("s1", [U2], A2, holder=turn.lease.holder)
    assert manager.history("s1") == [U1, U2, A2]


class CallCounting:
    """The store, with the name of each method called on it recorded (and the lease-related arguments), and the
    messages each load answered."""

    def __init__(self, store) -> None:
        self.store, self.calls, self.loaded = store, [], []

    def __getattr__(self, name):
        attribute = getattr(self.store, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            self.calls.append((name, kwargs.get("lease") is not None or kwargs.get("release", False)))
            answer = attribute(*args, **kwargs)
            if name == "load":
                self.loaded.append(answer[1])
            return answer

        return call


async def test_a_committed_turn_is_two_store_calls_and_gives_its_lease_back_with_the_commit(open_backend, clock):
    """The lease is taken with the load and given back with the commit: two round trips, not four."""
    store = open_backend()
    SessionManager(store, None, clock=clock).create("s1", system_prompt="Be terse.", messages=[U1, A1], owner="al")
    counting = CallCounting(store)
    manager = SessionManager(counting, None, clock=clock)
    async with manager.turn("s1", "al") as turn:
        assert (turn.record.system_prompt, turn.history) == ("Be terse.", [U1, A1])  # read as the lease was taken
        with pytest.raises(SessionBusy):
            store.acquire_lease("s1", "another-replica", ttl_s=60)
        await manager.commit(turn, [U2], A2)
        store.acquire_lease("s1", "another-replica", ttl_s=60)  # given back by the commit, inside the turn still
    assert counting.calls == [("load", True), ("append", True)]  # no release at exit: nothing left to give back
    assert store.messages("s1") == [U1, A1, U2, A2]
    with pytest.raises(SessionBusy):  # exit did not release the lease the other replica now holds
        store.append("s1", [U1], 0.0)


async def test_a_turn_reads_only_what_was_appended_since_the_last_turn_here_until_the_history_is_new(
    open_backend, clock
):
    """The manager holds the history its turns read; the next turn's load asks for the messages after it, and gets
    them all again when the session was cleared, or deleted and created again, elsewhere."""
    store = open_backend()
    counting = CallCounting(store)
    manager, elsewhere = SessionManager(counting, None, clock=clock), SessionManager(store, None, clock=clock)
    manager.create("s1", messages=[U1, A1])
    async with manager.turn("s1") as turn:
        assert turn.history == [U1, A1]
        await manager.commit(turn, [U2], A2)
    elsewhere.append("s1", [U1])  # another route, or another replica
    async with manager.turn("s1") as turn:
        assert turn.history == [U1, A1, U2, A2, U1] == store.messages("s1")
        await manager.commit(turn, [U2], A2)
    assert counting.loaded == [[U1, A1], [U2, A2, U1]]
    assert counting.calls == [("create", False), ("append", False), *[("load", True), ("append", True)] * 2]
    elsewhere.clear("s1")
    elsewhere.append("s1", [A1])
    async with manager.turn("s1") as turn:
        assert turn.history == [A1] == counting.loaded[-1]  # a new history: all of it, none of the held one
    elsewhere.destroy("s1")
    elsewhere.create("s1", messages=[U2])
    async with manager.turn("s1") as turn:
        assert turn.history == [U2] == counting.loaded[-1]


async def test_an_uncommitted_turn_gives_its_lease_back_at_exit(open_backend, clock):
    store = open_backend()
    SessionManager(store, None, clock=clock).create("s1")
    counting = CallCounting(store)
    manager = SessionManager(counting, None, clock=clock)
    async with manager.turn("s1"):
        pass
    assert counting.calls == [("load", True), ("release_lease", False)]
    store.acquire_lease("s1", "another-replica", ttl_s=60)


async def test_no_renewal_takes_the_lease_again_after_the_commit_gave_it_back(open_backend, clock):
    store = open_backend()
    manager = SessionManager(store, None, lease_ttl_s=0.15, clock=clock)  # renewed every 0.05 s
    manager.create("s1")
    async with manager.turn("s1") as turn:
        await asyncio.sleep(0.12)  # renewals running
        await manager.commit(turn, [U1], A1)
        await asyncio.sleep(0.2)  # four renewal periods after the commit
        store.acquire_lease("s1", "another-replica", ttl_s=60)  # free: nothing renewed the lease


class SlowRenewals:
    """The store, with acquire_lease (a turn's renewals) taking 0.3 s, called from worker threads."""

    runs_on_loop = False

    def __init__(self, store) -> None:
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def acquire_lease(self, *args, **kwargs) -> None:
        time.sleep(0.3)
        self.store.acquire_lease(*args, **kwargs)


@pytest.mark.parametrize("ending", ["cancelled", "committed"])
async def test_a_turn_ending_during_a_renewal_leaves_the_lease_free_after_it(open_backend, clock, ending):
    """The renewal in flight lands before the lease is given back (by exit, or by the commit), never after."""
    store = open_backend()
    manager = SessionManager(SlowRenewals(store), None, lease_ttl_s=0.9, clock=clock)  # renewed every 0.3 s
    manager.create("s1")
    renewing = asyncio.Event()

    async def turn() -> None:
        async with manager.turn("s1") as running:
            await asyncio.sleep(0.4)  # a renewal is in flight (0.3 s to 0.6 s)
            renewing.set()
            if ending == "committed":
                await manager.commit(running, [U1], A1)
            await asyncio.sleep(30)

    task = asyncio.create_task(turn())
    await renewing.wait()
    await asyncio.sleep(0.3 if ending == "committed" else 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)  # past the renewal's landing, within what it would hold the lease for
    store.acquire_lease("s1", "another-replica", ttl_s=60)  # free: nothing took it again


async def test_a_turn_that_would_queue_checks_its_session_first(manager):
    """Queued behind a running turn, a request for a missing (or another owner's) session fails at once."""
    manager.create("s1", owner="al")
    async with manager.turn("s1", "al"):
        for owner, session_id in (("bob", "s1"), ("al", "nope")):
            with pytest.raises(SessionNotFound):
                async with asyncio.timeout(5):  # not after the running turn, which never ends here
                    async with manager.turn(session_id, owner):
                        pass
    async with manager.turn("s1", "al"):
        pass
    with pytest.raises(SessionNotFound):
        async with manager.turn("s1", "bob"):  # not queued: the load with the lease says it
            pass
    assert manager._turn_locks == {}


async def test_a_lease_held_elsewhere_makes_the_turn_busy(manager, store):
    manager.create("s1")
    store.acquire_lease("s1", "another-replica", ttl_s=60)
    with pytest.raises(SessionBusy):
        async with manager.turn("s1"):
            pass
    assert manager._turn_locks == {}
    store.release_lease("s1", "another-replica")
    async with manager.turn("s1"):
        pass


async def test_a_long_turn_renews_its_lease(open_backend, clock):
    store = open_backend()
    manager = SessionManager(store, None, lease_ttl_s=0.6, clock=clock)
    manager.create("s1")
    async with manager.turn("s1"):
        await asyncio.sleep(1.5)  # well past the lease's first expiry (renewed every 0.2 s)
        with pytest.raises(SessionBusy):
            store.acquire_lease("s1", "someone-else", ttl_s=1)
    store.acquire_lease("s1", "someone-else", ttl_s=1)


async def test_a_cancelled_turn_gives_its_lease_back(manager, store):
    manager.create("s1")
    inside = asyncio.Event()

    async def turn() -> None:
        async with manager.turn("s1"):
            inside.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(turn())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.acquire_lease("s1", "next", ttl_s=5)  # free at once, not after lease_ttl_s
    assert manager._turn_locks == {}


async def test_expiry_never_removes_a_session_leased_elsewhere(manager, store, clock, engine):
    manager.create("s1")
    store.acquire_lease("s1", "another-replica", ttl_s=60)
    clock.advance(120)
    assert manager.expire_idle() == []
    store.release_lease("s1", "another-replica")
    assert manager.expire_idle() == ["s1"] and engine.released == ["s1"]


def test_a_remote_engine_is_asked_to_release_only_what_the_store_reports(store, clock):
    """The ingress's manager: its engine is a call to a replica, made only for sessions whose record reports KV."""
    remote = RecordingEngine()
    ingress = SessionManager(store, remote, max_sessions=3, idle_ttl_s=60, release_unreported=False, clock=clock)
    ingress.create("never-ran")
    ingress.destroy("never-ran")
    ingress.create("ran")
    ingress.commit_turn("ran", [U1], A1, kv=KVReport("device", 12, "replica-1"))
    ingress.clear("ran")  # reported KV: released, and the report reset
    ingress.append("ran", [U1])
    ingress.destroy("ran")  # the report was reset by clear: nothing more to ask
    assert remote.released == ["ran"]
