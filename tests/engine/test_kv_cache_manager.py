"""Exact block ids for the session KV lifecycle: reuse, copy-on-write, offload, restore, drop (block_size 4)."""

from serving.engine.block_pool import DROPPED
from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import Request
from serving.engine.types import SamplingParams


class FakeCopier:
    def __init__(self):
        self.calls = []

    def swap_out(self, pairs):
        self.calls.append(("out", pairs))

    def swap_in(self, pairs):
        self.calls.append(("in", pairs))

    def copy(self, pairs):
        self.calls.append(("copy", pairs))


def manager(device=6, host=4):
    return KVCacheManager(device, host, block_size=4, copier=FakeCopier())


def request(rid, prompt, key=None):
    return Request(rid, list(prompt), SamplingParams(), cache_key=key)


def start(kv, req):
    """Admit and compute the whole prompt (as the scheduler + runner would)."""
    assert kv.attach(req)
    assert kv.allocate_slots(req, req.num_uncomputed_tokens)
    req.num_computed_tokens = req.num_tokens


def turn(kv, rid, prompt, key=None, reply=(99,)):
    """A whole turn: prompt, then the reply tokens (the last one never gets KV)."""
    req = request(rid, prompt, key)
    start(kv, req)
    for i, token in enumerate(reply):
        req.all_token_ids.append(token)
        if i < len(reply) - 1:
            assert kv.allocate_slots(req, 1)
            req.num_computed_tokens += 1
    kv.finish(req)
    return req


def test_stateless_request_frees_everything():
    kv = manager()
    req = request("r", range(10))
    start(kv, req)
    assert req.block_ids == [0, 1, 2] and kv.device.num_free == 3
    kv.finish(req)
    assert req.block_ids == [] and kv.device.num_free == 6 and kv.sessions == {}


def test_session_keeps_its_kv_and_the_next_turn_reuses_the_common_prefix():
    kv = manager()
    first = turn(kv, "t1", range(10), key="a", reply=(50, 51))
    assert kv.session_info("a") == ("device", 11)  # prompt + first reply token; the last has no KV yet
    assert kv.sessions["a"].block_ids == [0, 1, 2]
    second = request("t2", [*first.all_token_ids, 60, 61, 62], key="a")
    assert kv.attach(second)
    assert (second.num_computed_tokens, second.num_cached_tokens, second.block_ids) == (11, 11, [0, 1, 2])
    assert kv.session_info("a") == ("device", 11)  # busy: the turn holds the blocks
    assert kv.allocate_slots(second, 4)
    assert second.block_ids == [0, 1, 2, 3]
    assert kv.copier.calls == []


def test_edited_history_reuses_only_the_common_prefix_and_frees_the_rest():
    kv = manager()
    turn(kv, "t1", range(10), key="a", reply=(50, 51))
    edited = request("t2", [0, 1, 2, 3, 4, 77, 78, 79, 80], key="a")
    assert kv.attach(edited)
    assert (edited.num_cached_tokens, edited.block_ids) == (5, [0, 1])
    assert kv.device.ref_count(2) == 0
    assert kv.allocate_slots(edited, 4)
    assert edited.block_ids == [0, 1, 3]  # free queue: 3, 4, 5, then 2 (freed last)


def test_prompt_fully_cached_still_computes_its_last_token():
    kv = manager()
    turn(kv, "t1", range(8), key="a")
    again = request("t2", range(8), key="a")
    assert kv.attach(again)
    assert again.num_computed_tokens == 7 and again.num_uncomputed_tokens == 1


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    kv = manager()
    parent = turn(kv, "t1", range(10), key="a", reply=(50, 51))
    kv.fork("a", "b")
    assert kv.session_info("b") == ("device", 11)
    assert [kv.device.ref_count(b) for b in (0, 1, 2)] == [2, 2, 2]
    child = request("t2", [*parent.all_token_ids, 70], key="b")
    assert kv.attach(child)
    assert child.block_ids == [0, 1, 3]  # block 2 holds tokens 8..10 and the child writes token 11 there
    assert kv.copier.calls == [("copy", [(2, 3)])]
    assert [kv.device.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    sibling = request("t3", [*parent.all_token_ids, 80], key="a")
    assert kv.attach(sibling)
    assert sibling.block_ids == [0, 1, 2]  # now the parent is the only holder of block 2: no copy
    assert len(kv.copier.calls) == 1
    for req in (child, sibling):
        req.num_computed_tokens = 11
        kv.finish(req)
    kv.release("a")
    assert kv.device.num_free == 3  # b still holds 0, 1, 3
    kv.release("b")
    assert kv.device.num_free == 6


def test_idle_sessions_move_to_host_when_the_pool_is_full_and_come_back():
    kv = manager(device=4, host=3)
    turn(kv, "a1", range(8), key="a")  # blocks 0, 1
    turn(kv, "b1", range(100, 104), key="b")  # block 2
    big = request("r", range(200, 208))
    start(kv, big)  # needs 2 blocks, 1 free: the least recently used idle session (a) goes to the host
    assert kv.copier.calls == [("out", [(0, 0), (1, 1)])]
    assert big.block_ids == [3, 0]
    assert kv.session_info("a") == ("host", 8) and kv.session_info("b") == ("device", 4)
    assert (kv.device.num_used, kv.host.num_used) == (3, 2)
    kv.finish(big)
    back = request("a2", [*range(8), 9, 10], key="a")
    assert kv.attach(back)
    assert kv.copier.calls[-1] == ("in", [(0, 1), (1, 3)])
    assert (back.block_ids, back.num_cached_tokens) == ([1, 3], 8)
    assert kv.host.num_used == 0 and kv.counters["restored_sessions"] == 1


def test_past_the_host_budget_the_least_recently_used_sessions_are_dropped():
    kv = manager(device=4, host=3)
    turn(kv, "a1", range(8), key="a")  # device 0, 1
    turn(kv, "b1", range(100, 104), key="b")  # device 2
    start(kv, filler := request("f", range(200, 216)))  # 4 blocks: a and b both go to the host (2 + 1)
    assert kv.session_info("a") == ("host", 8) and kv.session_info("b") == ("host", 4)
    assert kv.host.num_free == 0
    kv.finish(filler)
    turn(kv, "d1", range(300, 312), key="d")  # 3 device blocks
    start(kv, request("g", range(400, 408)))  # d must go out: a then b are dropped to make host room
    assert kv.session_info("d") == ("host", 12)
    assert kv.session_info("a") == ("none", 0) and kv.session_info("b") == ("none", 0)
    assert kv.counters["dropped_sessions"] == 2
    assert kv.copier.calls[-1] == ("out", [(3, 0), (0, 1), (1, 2)])


def test_a_session_bigger_than_the_host_tier_is_dropped():
    kv = manager(device=4, host=1)
    turn(kv, "a1", range(8), key="a")  # 2 blocks > host
    start(kv, request("r", range(100, 112)))
    assert kv.session_info("a") == ("none", 0)
    assert kv.host.num_used == 0 and [c for c in kv.copier.calls if c[0] == "out"] == []


def test_restore_waits_for_device_room():
    kv = manager(device=3, host=3)
    turn(kv, "a1", range(8), key="a")
    hog = request("hog", range(100, 112))
    start(kv, hog)  # a goes to the host; hog holds all 3 device blocks
    back = request("a2", [*range(8), 5], key="a")
    assert not kv.attach(back)
    assert kv.session_info("a") == ("host", 8) and not back.attached
    kv.finish(hog)
    assert kv.attach(back) and back.num_cached_tokens == 8


def test_release_while_a_turn_runs_frees_its_blocks_when_it_ends():
    kv = manager()
    turn(kv, "t1", range(8), key="a")
    second = request("t2", [*range(8), 1, 2], key="a")
    start(kv, second)
    kv.release("a")
    assert kv.session_info("a") == ("none", 0)
    kv.finish(second)
    assert kv.device.num_free == 6 and kv.sessions == {}


def test_preempt_frees_blocks_and_resets_progress():
    kv = manager()
    req = request("r", range(10), key="a")
    start(kv, req)
    kv.preempt(req)
    assert (req.block_ids, req.num_computed_tokens, req.attached) == ([], 0, True)
    assert kv.device.num_free == 6
    assert kv.allocate_slots(req, 10) and req.block_ids == [3, 4, 5]


# ------------------------------------------------------------------------------ all-sliding models (window 6)


def sliding(device=8, host=8):
    return KVCacheManager(device, host, block_size=4, copier=FakeCopier(), window=6)


def test_an_all_sliding_model_frees_the_blocks_behind_every_window():
    kv = sliding()
    req = request("r", range(20), key="s")
    start(kv, req)  # the prompt's chunk attends within itself: nothing dropped before it runs
    assert req.block_ids == [0, 1, 2, 3, 4]
    req.all_token_ids.append(99)
    assert kv.allocate_slots(req, 1)  # the token at 20 reads keys 15..20: blocks 0-2 (keys 0..11) go
    assert req.block_ids == [DROPPED, DROPPED, DROPPED, 3, 4, 5] and kv.device.num_used == 3
    req.num_computed_tokens += 1
    req.all_token_ids.append(98)
    assert kv.allocate_slots(req, 1)  # keys 16..21: block 3 (keys 12..15) goes
    assert req.block_ids == [DROPPED, DROPPED, DROPPED, DROPPED, 4, 5] and kv.device.num_used == 2
    kv.finish(req)
    assert kv.session_info("s") == ("device", 21) and kv.device.num_used == 2


def test_a_sliding_session_offloads_and_restores_only_the_blocks_it_holds():
    kv = sliding(device=4, host=4)
    first = turn(kv, "a1", range(16), key="a", reply=(99, 98, 97))  # 18 computed: blocks 0-2 dropped on the way
    assert kv.sessions["a"].block_ids == [DROPPED, DROPPED, DROPPED, 3, 1]
    start(kv, hog := request("hog", range(100, 112)))  # 3 blocks, 2 free: a goes to the host
    assert kv.session_info("a") == ("host", 18) and kv.host.num_used == 2
    assert kv.sessions["a"].block_ids == [DROPPED, DROPPED, DROPPED, 0, 1]
    assert kv.copier.calls[-1] == ("out", [(3, 0), (1, 1)])
    kv.finish(hog)
    back = request("a2", [*first.all_token_ids, 5, 6], key="a")
    assert kv.attach(back) and back.num_computed_tokens == 18  # the new tokens' windows are all held
    assert back.block_ids[:3] == [DROPPED] * 3 and kv.copier.calls[-1] == ("in", [(0, 1), (1, 0)])
    assert kv.host.num_used == 0 and kv.device.num_used == 2


def test_a_prompt_that_leaves_the_held_window_recomputes_from_the_start():
    kv = sliding()
    first = turn(kv, "a1", range(16), key="a", reply=(99, 98, 97))
    edited = request("a2", [*first.all_token_ids[:10], 50, 51], key="a")  # diverges at 10: needs keys 5..9
    assert kv.attach(edited)
    assert edited.num_computed_tokens == 0 and edited.block_ids == [] and kv.device.num_used == 0


def test_without_a_window_every_block_is_kept():
    kv = manager(device=8)
    turn(kv, "a1", range(16), key="a", reply=(99, 98, 97))
    assert DROPPED not in kv.sessions["a"].block_ids and kv.device.num_used == 5
