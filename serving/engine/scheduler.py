"""Which tokens run in the next forward pass (plain Python, no torch).

One token budget (`max_batch_tokens`) per step covers decode and prefill alike: a request's tokens to compute
are `num_tokens - num_computed_tokens`, one for a decoding request, the rest of the prompt (cut into chunks)
for a prefilling one. Decoding requests are served first, then unfinished prefills, then waiting requests in
arrival order, up to `max_batch_size` running requests. When blocks run out even after idle sessions moved to
the host tier, the most recently admitted running request is preempted: its blocks are freed and it goes back to
the front of the queue to recompute (vLLM's recompute preemption).
"""

from __future__ import annotations

from collections import deque
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
    def __init__(self, kv_manager: KVCacheManager, max_batch_size: int, max_batch_tokens: int) -> None:
        self.kv_manager = kv_manager
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
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
        # 2. waiting requests in arrival order (preempted ones first), unless memory ran short above
        while self.waiting and budget() > 0 and len(self.running) < self.max_batch_size and not out.preempted_ids:
            request = self.waiting[0]
            idle = not self.running  # nothing will free blocks: waiting requests holding some must yield them
            while not self.kv_manager.attach(request):
                if not (idle and self._preempt_waiting_holder(request, out)):
                    break
            if not request.attached:
                break
            n = min(request.num_uncomputed_tokens, budget())
            if not self._allocate(request, n, scheduled, out, preempt_running=False, idle=idle):
                break  # stays first in line, holding its session's KV
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request] = n
        for request, n in sorted(scheduled.items(), key=lambda item: item[1] > 1):
            out.requests.append(request)
            out.num_tokens.append(n)
        return out

    def _allocate(
        self,
        request: Request,
        n: int,
        scheduled: dict[Request, int],
        out: SchedulerOutput,
        *,
        preempt_running: bool,
        idle: bool = True,
    ) -> bool:
        """Blocks for `n` more tokens; if short, preempt waiting requests holding blocks, then (if allowed) the
        most recently admitted running request."""
        while not self.kv_manager.allocate_slots(request, n):
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
