"""Token budget, batch order, admission and preemption, with exact block ids (block_size 4, no model)."""

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import Request, RequestStatus
from serving.engine.scheduler import Scheduler
from serving.engine.types import SamplingParams


class NoCopies:
    """No tier moves happen here: no sessions, no host tier."""

    def swap_out(self, pairs):
        raise AssertionError(pairs)

    swap_in = copy = swap_out


def setup(num_blocks=16, max_batch_size=4, max_batch_tokens=12):
    kv = KVCacheManager(num_blocks, 0, block_size=4, copier=NoCopies())
    return Scheduler(kv, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)


def add(scheduler, rid, prompt_len):
    request = Request(rid, list(range(prompt_len)), SamplingParams())
    scheduler.add(request)
    return request


def step(scheduler, max_new_tokens=100):
    """schedule -> (pretend forward) -> update; sampled requests get token 7; returns [(id, n), ...]."""
    out = scheduler.schedule()
    for request in scheduler.update(out):
        request.all_token_ids.append(7)
        if request.num_output_tokens >= max_new_tokens:
            scheduler.remove(request)
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_tokens, strict=True)]


def test_long_prompts_are_prefilled_in_chunks_and_single_token_rows_come_first():
    scheduler = setup()
    c = add(scheduler, "c", 30)
    assert step(scheduler) == [("c", 12)]
    assert c.block_ids == [0, 1, 2]
    a = add(scheduler, "a", 1)
    assert step(scheduler) == [("c", 12)]  # running prefills take the budget before new requests
    assert step(scheduler) == [("a", 1), ("c", 6)]  # a is admitted; its one-token row goes first
    assert c.num_output_tokens == 1 and c.block_ids == [0, 1, 2, 3, 4, 5, 6, 7]
    assert step(scheduler) == [("c", 1), ("a", 1)]  # decodes keep their admission order
    assert len(c.block_ids) == 8 and a.block_ids == [8]  # c: 31 tokens in 8 blocks


def test_batch_size_limits_admission():
    scheduler = setup(max_batch_size=2)
    for rid in "abc":
        add(scheduler, rid, 2)
    assert step(scheduler, max_new_tokens=2) == [("a", 2), ("b", 2)]
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    assert step(scheduler, max_new_tokens=2) == [("a", 1), ("b", 1)]  # both finish
    assert step(scheduler, max_new_tokens=2) == [("c", 2)]
    assert scheduler.kv_manager.device.num_used == 1


def test_out_of_blocks_preempts_the_latest_request_which_recomputes_later():
    scheduler = setup(num_blocks=4, max_batch_tokens=16)
    a, b = add(scheduler, "a", 7), add(scheduler, "b", 7)
    assert step(scheduler) == [("a", 7), ("b", 7)]
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    assert step(scheduler) == [("a", 1), ("b", 1)]  # token 8 still fits in each one's second block
    out = scheduler.schedule()  # token 9 needs a third block each: b is preempted for a
    assert [(r.request_id, n) for r, n in zip(out.requests, out.num_tokens, strict=True)] == [("a", 1)]
    assert out.preempted_ids == ["b"]
    assert (a.block_ids, b.block_ids, b.num_computed_tokens) == ([0, 1, 2], [], 0)
    assert b.status is RequestStatus.WAITING and list(scheduler.waiting) == [b]
    for request in scheduler.update(out):
        request.all_token_ids.append(7)
    assert step(scheduler) == [("a", 1)]  # b needs 3 blocks for its 10 tokens; 1 is free
    scheduler.remove(a)
    assert step(scheduler) == [("b", 9)]  # prompt + its 2 reply tokens, recomputed at once
    assert b.block_ids == [3, 0, 1] and b.num_output_tokens == 3


def test_a_request_that_cannot_fit_alone_preempts_itself():
    scheduler = setup(num_blocks=2, max_batch_tokens=16)
    a = add(scheduler, "a", 8)
    assert step(scheduler) == [("a", 8)]
    out = scheduler.schedule()
    assert out.is_empty and out.preempted_ids == ["a"] and a.block_ids == []


def test_removing_a_waiting_request_frees_nothing_it_did_not_have():
    scheduler = setup()
    a = add(scheduler, "a", 5)
    scheduler.remove(a)
    assert not scheduler.has_work() and a.status is RequestStatus.FINISHED
    assert scheduler.kv_manager.device.num_used == 0


def test_a_waiting_turn_holding_its_session_blocks_yields_them_rather_than_deadlock():
    scheduler = setup(num_blocks=4, max_batch_tokens=16)
    first = Request("s1", list(range(8)), SamplingParams(), cache_key="s")
    scheduler.add(first)
    assert step(scheduler, max_new_tokens=1) == [("s1", 8)]  # the session keeps blocks 0, 1
    r = add(scheduler, "r", 7)
    assert step(scheduler) == [("r", 7)] and r.block_ids == [2, 3]
    turn = Request("s2", [*first.all_token_ids[:8], *range(50, 58)], SamplingParams(), cache_key="s")
    scheduler.add(turn)
    assert step(scheduler) == [("r", 1)]  # the turn took its 8 cached tokens but has no room for 8 more
    assert (turn.attached, turn.block_ids, turn.num_computed_tokens) == (True, [0, 1], 8)
    out = scheduler.schedule()  # r's 9th token needs a block: the waiting turn gives its blocks back
    assert out.preempted_ids == ["s2"] and r.block_ids == [2, 3, 0]
    assert (turn.block_ids, turn.num_computed_tokens) == ([], 0)
    scheduler.update(out)
    scheduler.remove(r)
    assert step(scheduler) == [("s2", 16)]  # recomputed in full, and it fits now
    assert turn.block_ids == [1, 2, 3, 0] and turn.num_cached_tokens == 0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def clocked(num_blocks: int, max_batch_size: int, max_wait_s: float):
    """A scheduler and its KV manager on one test clock, with a 10 s grace period for finished turns' KV."""
    clock = Clock()
    kv = KVCacheManager(num_blocks, 0, block_size=4, copier=NoCopies(), grace_s=10.0, clock=clock)
    scheduler = Scheduler(kv, max_batch_size=max_batch_size, max_batch_tokens=16, max_wait_s=max_wait_s, clock=clock)
    return clock, kv, scheduler


def test_a_resident_sessions_turn_goes_first_until_an_older_one_waited_past_the_aging_bound():
    clock, kv, scheduler = clocked(6, max_batch_size=4, max_wait_s=5.0)
    first = Request("s1", list(range(8)), SamplingParams(), cache_key="s")
    scheduler.add(first)
    assert step(scheduler, max_new_tokens=1) == [("s1", 8)]  # s keeps blocks 0, 1, in its grace period
    add(scheduler, "busy", 2)  # keeps the engine busy (an idle engine may take blocks in their grace period)
    assert step(scheduler) == [("busy", 2)]
    hog = add(scheduler, "hog", 15)  # needs 4 blocks: 3 are free and s's are in their grace period
    clock.now = 1.0
    assert step(scheduler) == [("busy", 1)]
    turn = Request("s2", [*first.all_token_ids, 5, 6, 7], SamplingParams(), cache_key="s", arrival_s=1.0)
    scheduler.add(turn)
    assert step(scheduler) == [("busy", 1), ("s2", 4)]  # resident: admitted ahead of the older hog
    assert turn.num_cached_tokens == 8 and hog.block_ids == []
    scheduler.remove(turn)  # s's KV: 3 blocks (12 tokens), in its grace period again
    clock.now = 5.0  # hog has waited 5 s: it goes first now, and may take s's blocks though s is in its grace
    assert step(scheduler) == [("busy", 1), ("hog", 15)]
    assert kv.session_info("s") == ("none", 0)  # no host tier: moving it meant dropping it


def test_without_an_aging_bound_admission_is_plain_arrival_order():
    _clock, _kv, scheduler = clocked(8, max_batch_size=1, max_wait_s=0.0)
    first = Request("s1", list(range(8)), SamplingParams(), cache_key="s")
    scheduler.add(first)
    step(scheduler, max_new_tokens=1)
    add(scheduler, "other", 4)
    scheduler.add(Request("s2", [*first.all_token_ids, 5], SamplingParams(), cache_key="s"))
    assert step(scheduler, max_new_tokens=1) == [("other", 4)]
