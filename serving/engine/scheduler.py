"""Which tokens run in the next forward pass (plain Python, no torch).

One token budget (`max_batch_tokens`) per step covers decode and prefill alike: a request's tokens to compute
are `num_tokens - num_computed_tokens`, one for a decoding request, the rest of the prompt (cut into chunks)
for a prefilling one. Decoding requests are served first, then unfinished prefills, then waiting requests, up to
`max_batch_size` running requests. When blocks run out even after idle sessions' KV was reclaimed (eviction.py),
the most recently admitted running request is preempted: its blocks are freed and it goes back to the front of
the queue to recompute (vLLM's recompute preemption).

Admission order under memory pressure: a turn whose session's KV waits on the device goes before older turns that
would first have to move someone's KV (it costs only its new tokens, and its KV stays put), but only until the
oldest waiting request has waited `max_wait_s`: from then on requests past that bound go first, in arrival order,
and may take the device blocks of sessions still in their grace period. So resident sessions keep their KV warm
while nobody's wait exceeds about `max_wait_s` plus the turns already running.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    # Requests in this step's batch, in batch order: single-token rows (decode) first, then prefill chunks.
    requests: list[Request] = field(default_factory=list)
    # Tokens each of `requests` runs this step, starting at its num_computed_tokens (same order).
    num_tokens: list[int] = field(default_factory=list)
    # Ids of requests preempted this step (their blocks were freed; they wait to recompute).
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv_manager = kv_manager
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s  # aging bound: past it a waiting request is admitted in arrival order
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and hand its KV to its session or the pool."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_manager.finish(request)
        request.status = RequestStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[Request, int] = {}

        def budget() -> int:
            return self.max_batch_tokens - sum(scheduled.values())

        # 1. running requests: decodes, then the next chunk of prefills
        for request in sorted(self.running, key=lambda r: r.num_uncomputed_tokens > 1):
            n = min(request.num_uncomputed_tokens, budget())
            if n == 0 or request.status is not RequestStatus.RUNNING:  # budget spent, or preempted just now
                continue
            if self._allocate(request, n, scheduled, out, preempt_running=True):
                scheduled[request] = n
            else:
                self._preempt(request, out)
        # 2. waiting requests (see the module's admission order), unless memory ran short above
        now = self.clock()
        while self.waiting and budget() > 0 and len(self.running) < self.max_batch_size and not out.preempted_ids:
            request, aged = self._next_waiting(now)
            idle = not self.running  # nothing will free blocks: waiting requests holding some must yield them
            while not self.kv_manager.attach(request, take_grace=aged or idle):
                if not (idle and self._preempt_waiting_holder(request, out)):
                    break
            if not request.attached:
                break
            n = min(request.num_uncomputed_tokens, budget())
            if not self._allocate(request, n, scheduled, out, preempt_running=False, idle=idle, take_grace=aged):
                break  # stays in line, holding its session's KV
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request] = n
        for request, n in sorted(scheduled.items(), key=lambda item: item[1] > 1):
            out.requests.append(request)
            out.num_tokens.append(n)
        return out

    def _next_waiting(self, now: float) -> tuple[Request, bool]:
        """The request to admit next, and whether it waited past the aging bound: the first such request in
        queue order (arrival order, preempted ones first); else one already holding blocks; else the first whose
        session's KV is idle on the device; else the first in line."""
        for request in self.waiting:
            if now - request.arrival_s >= self.max_wait_s:
                return request, True
        for request in self.waiting:
            if request.block_ids:
                return request, False
        resident = next((r for r in self.waiting if self.kv_manager.is_resident(r)), None)
        return resident or self.waiting[0], False

    def _allocate(
        self,
        request: Request,
        n: int,
        scheduled: dict[Request, int],
        out: SchedulerOutput,
        *,
        preempt_running: bool,
        idle: bool = True,
        take_grace: bool = True,
    ) -> bool:
        """Blocks for `n` more tokens; if short, preempt waiting requests holding blocks, then (if allowed) the
        most recently admitted running request. `take_grace`: room may come from sessions in their grace period."""
        while not self.kv_manager.allocate_slots(request, n, take_grace or idle):
            if idle and self._preempt_waiting_holder(request, out):
                continue
            victim = next((r for r in reversed(self.running) if r is not request), None)
            if not preempt_running or victim is None:
                return False
            scheduled.pop(victim, None)
            self._preempt(victim, out)
        return True

    def _preempt_waiting_holder(self, request: Request, out: SchedulerOutput) -> bool:
        holder = next((r for r in self.waiting if r is not request and r.block_ids), None)
        if holder is not None:
            self.kv_manager.preempt(holder)
            out.preempted_ids.append(holder.request_id)
        return holder is not None

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv_manager.preempt(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        out.preempted_ids.append(request.request_id)

    def update(self, out: SchedulerOutput) -> list[Request]:
        """After the forward pass: advance computed tokens; return the requests that get a sampled token."""
        sampled = []
        for request, n in zip(out.requests, out.num_tokens, strict=True):
            request.num_computed_tokens += n
            if request.num_computed_tokens == request.num_tokens:
                sampled.append(request)
        return sampled
