"""A fixed set of KV blocks with reference counts (plain Python, no torch).

A block holds `block_size` tokens of K and V for every layer. The pool only does bookkeeping: which block ids
are in use and by how many holders (a request's block table, a session, a fork sharing its parent's blocks).
Free blocks wait in a queue in LRU order: a freed block goes to the back and allocation takes from the front, so
the block freed longest ago is reused first. The engine keeps one pool per tier (device, host).

A block table entry may be `DROPPED`: KV that no layer will read again (before the window of an all-sliding
model) was given back, and the entry holds no block; `share` and `free` pass over it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

DROPPED = -1  # a block table entry whose block was freed because every layer's window has moved past it


class NoFreeBlocks(RuntimeError):
    """More blocks were requested than are free; callers check `num_free` first."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # least recently freed first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (reference count 1 each), least recently freed first."""
        if n > len(self._free):
            raise NoFreeBlocks(f"{n} blocks requested, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def share(self, block_ids: Iterable[int]) -> None:
        """One more holder for each block (a fork, or a block table borrowing a session's blocks)."""
        for block in block_ids:
            if block == DROPPED:
                continue
            assert self._ref_counts[block] > 0, f"block {block} is free"
            self._ref_counts[block] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """One holder less for each block; blocks nobody holds go to the back of the free queue."""
        for block in block_ids:
            if block == DROPPED:
                continue
            assert self._ref_counts[block] > 0, f"block {block} freed twice"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
