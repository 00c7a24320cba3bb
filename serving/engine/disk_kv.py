"""The disk tier: an idle session's KV as one safetensors file, bound to the token ids it encodes.

A file `<kv_dir>/<sha256(key)>.safetensors` holds two tensors, `blocks` [n, layers, 2, block_size, kv_heads,
head_dim] (block-major, so the first k blocks are one contiguous read) and the `token_ids` they encode, and metadata:
the format version, the engine's identity (model, dtype, block size, KV shape), the session key and a hash chain:
chain[i] = sha256(chain[i-1] + token ids of block i), chain[-1] = sha256(identity). A prompt reuses the stored KV
only when the stored token ids hash to the chain (the file is what was written, by an engine like this one), and
then only their common prefix with its own tokens, to the token (a reply re-tokenized differently may part from the
stored ids in the middle of a block): KV of another model, dtype or block size, of another session, or of a history
edited since, is never served; a file that cannot be read is discarded. Any replica sharing the directory may load
any session's file: the binding, not ownership, is what makes it safe. (Bit flips inside the tensor data are not
detected: checksumming the data would cost ~40 ms per 1,000 tokens of SmolLM2.)

Writes run on a writer thread (tmp file, fsync, rename), never on the engine's step loop, and a reader never sees a
half-written file: until its write is done, a session's KV is served from the snapshot taken in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serving.engine.token_ids import common_prefix_length
from serving.engine.types import KVTier

log = logging.getLogger(__name__)

FORMAT = "sessionserve-kv/2"  # 2: the token ids are stored, matched to the token
SUFFIX = ".safetensors"


class BlockIO(Protocol):
    """The model runner's side: copy blocks out of a pool (block-major, on the CPU) and into the device pool."""

    def gather(self, tier: KVTier, block_ids: list[int]) -> torch.Tensor: ...

    def scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None: ...


def hash_chain(identity: str, token_ids: Sequence[int], block_size: int) -> list[str]:
    """One hex digest per block of `token_ids` (the last one may be partial), each chained to the one before."""
    digest = hashlib.sha256(identity.encode()).digest()
    chain = []
    for start in range(0, len(token_ids), block_size):
        digest = hashlib.sha256(digest + array("q", token_ids[start : start + block_size]).tobytes()).digest()
        chain.append(digest.hex())
    return chain


def matching_tokens(
    identity: str, chain: Sequence[str], token_ids: Sequence[int], prompt: Sequence[int], bs: int
) -> int:
    """How many leading tokens of `prompt` the stored KV (over `token_ids`, bound by `chain`) encodes exactly: 0
    unless the token ids hash to the chain under this identity, else their common prefix with the prompt."""
    if hash_chain(identity, token_ids, bs) != list(chain):
        return 0
    return common_prefix_length(token_ids, prompt)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A session's KV taken out of a pool, waiting to be written (and served from memory until it is)."""

    token_ids: list[int]
    chain: list[str]
    blocks: torch.Tensor  # [n, layers, 2, block_size, kv_heads, head_dim] on the CPU


@dataclass(frozen=True, slots=True)
class DiskHit:
    """What a prompt may reuse from disk: `tokens` leading tokens, whose KV is in `blocks`."""

    tokens: int
    blocks: torch.Tensor
    io: BlockIO

    def restore(self, device_block_ids: list[int]) -> None:
        self.io.scatter(device_block_ids, self.blocks[: len(device_block_ids)])


class DiskKVStore:
    def __init__(self, directory: Path, budget_bytes: int, identity: str, block_size: int, io: BlockIO) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.identity = identity
        self.block_size = block_size
        self.io = io
        directory.mkdir(parents=True, exist_ok=True)
        self.counters = {"disk_writes": 0, "disk_loads": 0, "disk_rejected": 0, "disk_evicted": 0}
        self._lock = threading.Lock()
        self._pending: dict[str, Snapshot] = {}  # written or about to be; served from here meanwhile
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> bytes on disk, least recently used first
        self._scan()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._idle = threading.Condition(self._lock)
        self._writer = threading.Thread(target=self._write_forever, name="sessionserve-kv-writer", daemon=True)
        self._writer.start()

    def path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + SUFFIX)

    # ---------------------------------------------------------------------------------------- engine side

    def save(self, key: str, token_ids: list[int], tier: KVTier, block_ids: list[int]) -> None:
        """Snapshot a session's blocks now (the caller frees them after) and write them in the background."""
        blocks = self.io.gather(tier, block_ids)
        if blocks.numel() * blocks.element_size() > self.budget_bytes:
            return  # bigger than the whole disk tier: dropped, like a session bigger than the host tier
        snapshot = Snapshot(list(token_ids), hash_chain(self.identity, token_ids, self.block_size), blocks)
        with self._lock:
            self._pending[key] = snapshot
        self._queue.put(key)

    def load(self, key: str, prompt: Sequence[int], max_tokens: int) -> DiskHit | None:
        """The stored KV that matches `prompt` (at most `max_tokens` of it); None when nothing is stored. A hit of
        0 tokens means stale: stored KV none of which matches (another session's, another model's, an edited
        history), or a file that cannot be read (deleted, so its next turn does not try it again)."""
        with self._lock:
            snapshot = self._pending.get(key)
        if snapshot is not None:
            matched = common_prefix_length(snapshot.token_ids, prompt)  # our own memory: no chain to verify
            tokens = min(matched, max_tokens)
            if matched and not tokens:
                return None  # a one-token prompt: nothing it could reuse
            return DiskHit(tokens, snapshot.blocks[: self._blocks(tokens)], self.io)
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                self._check(meta, key)
                stored = f.get_tensor("token_ids").tolist()
                matched = matching_tokens(self.identity, json.loads(meta["chain"]), stored, prompt, self.block_size)
                tokens = min(max_tokens, matched)
                blocks = f.get_slice("blocks")[: self._blocks(tokens)]
        except Exception as error:  # truncated, foreign, wrong shape: never served, recomputed
            log.warning("discarding the KV file of session %r: %s", key, error)
            self.counters["disk_rejected"] += 1
            self.discard(key)
            return DiskHit(0, torch.empty(0), self.io)
        if not matched:
            self.counters["disk_rejected"] += 1
            return DiskHit(0, blocks, self.io)
        if not tokens:
            return None  # a one-token prompt: nothing it could reuse
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
        self.counters["disk_loads"] += 1
        return DiskHit(tokens, blocks, self.io)

    def discard(self, key: str) -> None:
        """Forget a session's KV on disk (destroyed, cleared, or its file unusable)."""
        with self._lock:
            self._pending.pop(key, None)
            self._files.pop(key, None)
            with contextlib.suppress(FileNotFoundError):
                self.path(key).unlink()

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._pending or key in self._files

    def keys(self) -> list[str]:
        with self._lock:
            return list({**self._files, **dict.fromkeys(self._pending)})

    def flush(self, timeout_s: float) -> bool:
        """Wait until every snapshot is on disk; False if some are still being written after timeout_s."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout_s)

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=30)

    # ---------------------------------------------------------------------------------------- internals

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _check(self, meta: dict[str, str], key: str) -> None:
        for name, expected in (("format", FORMAT), ("identity", self.identity), ("key", key)):
            if meta.get(name) != expected:
                raise ValueError(f"{name} is {meta.get(name)!r}, expected {expected!r}")

    def _scan(self) -> None:
        """Files already in the directory (a previous run, another replica): counted against the budget."""
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                if meta.get("format") == FORMAT and meta.get("identity") == self.identity and "key" in meta:
                    self._files[meta["key"]] = path.stat().st_size
            except Exception:
                log.warning("ignoring unreadable KV file %s", path)

    def _write_forever(self) -> None:
        while (key := self._queue.get()) is not None:
            with self._lock:
                snapshot = self._pending.get(key)
            if snapshot is not None:
                try:
                    self._write(key, snapshot)
                except Exception:  # disk full, directory gone: this session recomputes next time
                    log.exception("could not write the KV of session %r to disk", key)
                    with self._idle:
                        if self._pending.get(key) is snapshot:
                            del self._pending[key]
                        self._idle.notify_all()

    def _write(self, key: str, snapshot: Snapshot) -> None:
        path = self.path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        metadata = {
            "format": FORMAT,
            "identity": self.identity,
            "key": key,
            "chain": json.dumps(snapshot.chain),
        }
        token_ids = torch.tensor(snapshot.token_ids, dtype=torch.int64)
        save_file({"blocks": snapshot.blocks, "token_ids": token_ids}, str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._idle:
            if self._pending.get(key) is not snapshot:  # discarded or saved again meanwhile: this one is stale
                tmp.unlink()
                return
            os.replace(tmp, path)
            del self._pending[key]
            self._files[key] = path.stat().st_size
            self._files.move_to_end(key)
            self.counters["disk_writes"] += 1
            self._evict_over_budget()
            self._idle.notify_all()
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def _evict_over_budget(self) -> None:
        while sum(self._files.values()) > self.budget_bytes and len(self._files) > 1:
            victim, _ = self._files.popitem(last=False)
            with contextlib.suppress(FileNotFoundError):
                self.path(victim).unlink()
            self.counters["disk_evicted"] += 1
