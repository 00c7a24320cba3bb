"""The one eviction order, per KV policy, with exact block ids (block_size 4, no model): evictable KV is dropped
first, then pinned KV past its grace period moves to the host, then pinned KV in its grace period (only for a
caller allowed to take it); `none` keeps nothing after its turn."""

from serving.engine import eviction
from serving.engine.kv_cache_manager import KVCacheManager, SessionKV
from serving.engine.request import Request
from serving.engine.types import SamplingParams
from tests.engine.test_kv_cache_manager import FakeCopier, start


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def manager(device=6, host=6, grace_s=0.0):
    clock = Clock()
    return KVCacheManager(device, host, block_size=4, copier=FakeCopier(), grace_s=grace_s, clock=clock), clock


def turn(kv, rid, prompt, key, policy="pinned"):
    """A whole turn of a session with `policy`: prompt computed, one reply token (which has no KV)."""
    req = Request(rid, list(prompt), SamplingParams(), cache_key=key, kv_policy=policy)
    start(kv, req)
    req.all_token_ids.append(99)
    kv.finish(req)
    return req


def test_none_keeps_no_kv_after_its_turn_and_its_next_turn_recomputes():
    kv, _ = manager()
    turn(kv, "n1", range(8), key="n", policy="none")
    assert kv.session_info("n") == ("none", 0) and kv.device.num_free == 6
    again = Request("n2", [*range(8), 5], SamplingParams(), cache_key="n", kv_policy="none")
    assert kv.attach(again) and again.num_cached_tokens == 0


def test_evictable_is_dropped_before_any_pinned_kv_moves_even_when_it_is_the_most_recent():
    kv, _ = manager(device=5, host=6)
    turn(kv, "p1", range(8), key="p")  # pinned, least recently used: blocks 0, 1
    turn(kv, "e1", range(100, 108), key="e", policy="evictable")  # blocks 2, 3
    start(kv, big := Request("r", list(range(200, 208)), SamplingParams()))  # 2 blocks, 1 free
    assert kv.session_info("e") == ("none", 0)  # dropped, not moved
    assert kv.session_info("p") == ("device", 8)  # the pinned session did not move
    assert big.block_ids == [4, 2]
    assert kv.copier.calls == [] and kv.counters["evicted_sessions"] == 1
    assert kv.host.num_used == 0  # evictable KV never takes host room


def test_evictable_kv_is_reused_while_nobody_needed_the_room():
    kv, _ = manager()
    turn(kv, "e1", range(8), key="e", policy="evictable")
    again = Request("e2", [*range(8), 99, 5], SamplingParams(), cache_key="e", kv_policy="evictable")
    assert kv.attach(again) and again.num_cached_tokens == 8 and again.block_ids == [0, 1]


def test_pinned_past_its_grace_moves_to_host_before_pinned_in_its_grace():
    kv, clock = manager(device=5, host=6, grace_s=2.0)
    turn(kv, "a1", range(8), key="a")  # blocks 0, 1; ends at t=100
    clock.now = 103.0
    turn(kv, "b1", range(100, 108), key="b")  # blocks 2, 3; ends at t=103: in its grace until 105
    clock.now = 104.0
    request = Request("r", list(range(200, 208)), SamplingParams())
    assert kv.attach(request, take_grace=False) and kv.allocate_slots(request, 8, take_grace=False)
    assert kv.session_info("a") == ("host", 8) and kv.session_info("b") == ("device", 8)
    assert kv.copier.calls == [("out", [(0, 0), (1, 1)])]


def test_pinned_in_its_grace_is_kept_from_a_caller_without_the_right_and_yields_to_one_with_it():
    kv, clock = manager(device=3, host=6, grace_s=2.0)
    turn(kv, "a1", range(8), key="a")  # blocks 0, 1
    clock.now = 101.0
    request = Request("r", list(range(200, 208)), SamplingParams())
    assert kv.attach(request, take_grace=False)
    assert not kv.allocate_slots(request, 8, take_grace=False)  # a's turn ended 1 s ago: its blocks stay
    assert kv.session_info("a") == ("device", 8)
    assert kv.allocate_slots(request, 8, take_grace=True)  # e.g. the request waited past the aging bound
    assert kv.session_info("a") == ("host", 8) and request.block_ids == [2, 0]


def test_grace_expires_with_time():
    kv, clock = manager(device=3, host=6, grace_s=2.0)
    turn(kv, "a1", range(8), key="a")
    clock.now = 102.0  # exactly the grace period later
    request = Request("r", list(range(200, 208)), SamplingParams())
    assert kv.attach(request, take_grace=False) and kv.allocate_slots(request, 8, take_grace=False)
    assert kv.session_info("a") == ("host", 8)


def test_host_tier_drops_its_least_recently_used_session_for_room():
    idle = [SessionKV("old", tier="host"), SessionKV("new", tier="host")]
    victim = eviction.host_victim(idle)
    assert victim is not None and victim.key == "old"
    assert eviction.host_victim([]) is None


def test_device_victim_order_is_evictable_then_past_grace_then_in_grace():
    old = SessionKV("old", policy="pinned", tier="device", idle_since=90.0)
    fresh = SessionKV("fresh", policy="pinned", tier="device", idle_since=99.5)
    spare = SessionKV("spare", policy="evictable", tier="device", idle_since=99.9)

    def victim(idle, take_grace=False):
        found = eviction.device_victim(idle, now=100.0, grace_s=1.0, take_grace=take_grace)
        return None if found is None else (found.session.key, found.action)

    assert victim([fresh, old, spare]) == ("spare", "drop")
    assert victim([fresh, old]) == ("old", "offload")
    assert victim([fresh]) is None
    assert victim([fresh], take_grace=True) == ("fresh", "offload")
