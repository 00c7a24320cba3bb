"""The attention-backend interface: how one engine step's attention reads the paged KV pool.

The model runner describes a step once (`StepSequence` per sequence: its rows in the flattened batch, its
context, its block table) and hands it to the backend's `prepare`, which turns it into whatever metadata the
backend's kernels want (block tables as tensors, masks, split points), built once and shared by every layer.
Then, in each layer, `forward` gets the layer's queries, its fresh K/V (already written into the pool), the
layer's pool tensors and the layer's static facts (`LayerAttention`: sliding window, soft-capping, scale).

The engine owns the pool's memory: per layer, K and V are each a contiguous `[num_blocks, block_size,
kv_heads, head_dim]` tensor (flash-attn's paged layout and FlashInfer's NHD); block ids index dim 0, so tier
moves and copy-on-write stay one indexing op over all layers. A backend may order the elements *within* a
block its own way (`pool_views`; it then writes K/V itself, `write`): the CPU kernel keeps keys transposed.
A backend attends causally: query row `i` of a sequence
sits at position `context - rows + i` and sees keys `[0, position]`, or only the last `window` of them on a
sliding layer.

Implementations:
- `PortableBackend` (any device): gathers each sequence's blocks into a dense copy per layer, then torch SDPA
  (math path when soft-capping). Simple and exact; it copies the whole context every layer.
- `serving.engine.cpu_attention.CpuPagedBackend` (CPU, fp32): a C++ kernel that reads the blocks where they lie.

- `serving.engine.flex_attention.FlexPagedBackend` (CUDA, compiled): torch's flex_attention over the pool with a
  paged block mask. Runs eagerly on the CPU too (exact, slow: tests only).
- `serving.engine.flash_attention.FlashAttnPagedBackend` (CUDA, fp16/bf16, blocks of 256 tokens): flash-attn's
  paged KV cache, when the package is installed.

`select_backend` picks the fastest one that can serve the model (`choose_backend`, a pure function, decides;
`SESSIONSERVE_ATTENTION` forces one of auto, portable, cpu, flex, flash_attn).
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """What one layer's attention needs beyond its tensors (static, from the model's config)."""

    window: int | None = None  # sliding layers: attend to the last `window` tokens (the query's own included)
    softcap: float | None = None  # scores -> tanh(scores / softcap) * softcap before the softmax


@dataclass(frozen=True, slots=True)
class StepSequence:
    """One sequence's rows in a step: `rows` new tokens at rows [start, start + rows) of the flattened batch."""

    start: int
    rows: int
    context: int  # tokens attended after this step: cached + new
    # the blocks holding positions [0, context); in an all-sliding model, entries before the window of the
    # sequence's first row may be DROPPED (-1, freed): no query of the step attends them, nothing may read them
    block_ids: list[int]

    @property
    def fresh(self) -> bool:
        """A chunk with no cached prefix: its fresh K/V is its whole context."""
        return self.rows == self.context


class KVPair(NamedTuple):
    key: torch.Tensor
    value: torch.Tensor


class LayerTensors(NamedTuple):
    """One layer's tensors for a step: the step's Q/K/V and the layer's pool, as `pool_views` lays it out."""

    query: torch.Tensor  # [1, heads, rows, head_dim]
    key: torch.Tensor  # [1, kv_heads, rows, head_dim]: this step's K (already in the pool)
    value: torch.Tensor
    key_pool: torch.Tensor
    value_pool: torch.Tensor


class AttentionBackend(ABC):
    """Attention over the paged pool, one instance per model runner."""

    name: str = ""

    def pool_views(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V pools as this backend lays them out, from the engine's contiguous per-layer
        tensors `[num_blocks, block_size, kv_heads, head_dim]`. Only the order within a block may change: blocks
        stay the unit that tier moves and copy-on-write copy as a whole."""
        return keys, values

    def write(self, pool: KVPair, fresh: KVPair, slots: torch.Tensor, metadata: Any) -> None:
        """Store this step's K/V ([1, kv_heads, rows, head_dim]) at pool slots (block * block_size + offset);
        `metadata` is this step's, for a backend that derives its own write indices once per step."""
        (key_pool, value_pool), (key, value) = pool, fresh
        key_pool.view(-1, *key_pool.shape[2:]).index_copy_(0, slots, key[0].transpose(0, 1))
        value_pool.view(-1, *value_pool.shape[2:]).index_copy_(0, slots, value[0].transpose(0, 1))

    @abstractmethod
    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> Any:
        """Per-step metadata, shared by all layers. `sequences` come in row order: decodes (one row each,
        shortest context first), then prefill chunks."""

    @abstractmethod
    def forward(self, tensors: LayerTensors, metadata: Any, layer: LayerAttention, scaling: float) -> torch.Tensor:
        """The attention output, [rows, heads, head_dim]."""


# ---------------------------------------------------------------------------------------------- helpers


def causal_mask(
    rows: int, context: int, window: int | None, device: torch.device, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """[rows, context] bool (True: attended) for a chunk whose last row sits at `context - 1`; with `lengths`
    ([n]: each decode row's context, rows == 1) a [n, 1, 1, context] mask for a group of single-token rows."""
    keys = torch.arange(context, device=device)
    if lengths is not None:
        last = (lengths - 1)[:, None]
        mask = keys[None, :] <= last
        if window is not None:
            mask &= keys[None, :] > last - window
        return mask[:, None, None, :]
    positions = torch.arange(context - rows, context, device=device)[:, None]
    mask = keys[None, :] <= positions
    if window is not None:
        mask &= keys[None, :] > positions - window
    return mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Attention of q [b, heads, rows, dim] over k/v [b, kv_heads, keys, dim] with a bool mask (None: every key);
    SDPA unless soft-capped (then the math path, like transformers' eager)."""
    if softcap is None:
        gqa = q.dim() == 4 and q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    if q.dim() == 4 and q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


# ---------------------------------------------------------------------------------------------- portable


@dataclass(slots=True)
class _DecodeGroup:
    start: int
    count: int
    context: int  # longest context in the group
    lengths: torch.Tensor  # [count] contexts
    block_tables: torch.Tensor  # [count, max_blocks], padded with block 0


@dataclass(slots=True)
class _PortableMetadata:
    decodes: list[_DecodeGroup]
    prefills: list[tuple[StepSequence, torch.Tensor]]  # (chunk, its block ids as a tensor)
    device: torch.device
    masks: dict[tuple[int, int | None], torch.Tensor | None] = field(default_factory=dict)  # (item, window)


def _gather(pool: torch.Tensor, block_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, kv_heads, blocks * block_size, head_dim] (a strided view of one gather copy)."""
    return pool.index_select(0, block_ids.reshape(-1)).view(rows, -1, *pool.shape[2:]).transpose(1, 2)


class PortableBackend(AttentionBackend):
    """Gather + SDPA on any device: single-token rows of similar context share one SDPA call (keys padded to the
    group's longest context, query heads folded onto their KV head so no repeat_kv copy; a group keeps padding
    under 2x), one call per prefill chunk (a fresh chunk attends its own K/V, nothing gathered)."""

    name = "portable"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> _PortableMetadata:
        block_size = self.block_size
        decodes = [s for s in sequences if s.rows == 1 and not s.fresh]
        groups: list[_DecodeGroup] = []
        start = 0
        while start < len(decodes):
            first = decodes[start].context
            end = start + 1
            while end < len(decodes) and decodes[end].context <= max(2 * first, first + 4 * block_size):
                end += 1
            members = decodes[start:end]
            width = -(-members[-1].context // block_size)
            tables = [s.block_ids[:width] + [0] * (width - len(s.block_ids[:width])) for s in members]
            lengths = torch.tensor([s.context for s in members], device=device)
            # dropped entries (-1) gather block 0 instead: outside every window, masked like the padding
            block_tables = torch.tensor(tables, dtype=torch.long, device=device).clamp_(min=0)
            groups.append(_DecodeGroup(members[0].start, len(members), members[-1].context, lengths, block_tables))
            start = end
        prefills = [
            (s, torch.tensor(s.block_ids[: -(-s.context // block_size)], device=device).clamp_(min=0))
            for s in sequences
            if s.rows > 1 or s.fresh
        ]
        return _PortableMetadata(groups, prefills, device)

    def forward(self, tensors: LayerTensors, metadata: Any, layer: LayerAttention, scaling: float) -> torch.Tensor:
        query, key, value, key_pool, value_pool = tensors
        meta: _PortableMetadata = metadata
        _, heads, rows, head_dim = query.shape
        kv_heads = key.shape[1]
        window = layer.window
        out = query.new_empty(rows, heads, head_dim)
        for index, group in enumerate(meta.decodes):
            rows_ = slice(group.start, group.start + group.count)
            q = query[0, :, rows_].transpose(0, 1).reshape(group.count, kv_heads, heads // kv_heads, head_dim)
            k = _gather(key_pool, group.block_tables, group.count)[:, :, : group.context]
            v = _gather(value_pool, group.block_tables, group.count)[:, :, : group.context]
            mask_key = (index, window)
            if mask_key not in meta.masks:
                needed = group.count > 1 or (window is not None and group.context > window)
                meta.masks[mask_key] = (
                    causal_mask(1, group.context, window, meta.device, group.lengths) if needed else None
                )
            mask = meta.masks[mask_key]
            o = attend(q, k, v, mask, scaling, layer.softcap)
            out[rows_] = o.reshape(group.count, heads, head_dim)
        for index, (chunk, block_ids) in enumerate(meta.prefills):
            rows_ = slice(chunk.start, chunk.start + chunk.rows)
            q = query[:, :, rows_]
            if chunk.fresh:  # the chunk is the whole context: its fresh K/V, nothing gathered
                k, v = key[:, :, rows_], value[:, :, rows_]
            else:
                k = _gather(key_pool, block_ids, 1)[:, :, : chunk.context]
                v = _gather(value_pool, block_ids, 1)[:, :, : chunk.context]
            mask_key = (-1 - index, window)
            if mask_key not in meta.masks:
                meta.masks[mask_key] = causal_mask(chunk.rows, chunk.context, window, meta.device)
            o = attend(q, k, v, meta.masks[mask_key], scaling, layer.softcap)
            out[rows_] = o[0].transpose(0, 1)
        return out


# ---------------------------------------------------------------------------------------------- choice

BACKENDS = ("auto", "portable", "cpu", "flex", "flash_attn")
FLEX_TILE = 16  # flex_attention's Triton kernels tile KV in multiples of 16 keys: a pool block must be one


def choose_backend(
    device: torch.device, dtype: torch.dtype, block_size: int, installed: set[str], wanted: str = "auto"
) -> tuple[str, list[str]]:
    """Which backend serves this device, dtype and block size, given the optional packages `installed`
    ("flash_attn"); with the reasons the faster ones were passed over (logged). `wanted` forces one, and it is
    an error when it cannot serve. A pure function: the selection is unit-tested without those packages."""
    if wanted not in BACKENDS:
        raise ValueError(f"SESSIONSERVE_ATTENTION={wanted!r}: expected one of {', '.join(BACKENDS)}")
    checks: dict[str, str | None] = {}  # backend -> why it cannot serve (None: it can), fastest first
    if device.type == "cuda":
        checks["flash_attn"] = (
            "flash-attn is not installed" if "flash_attn" not in installed
            else f"flash-attn's paged KV needs engine.block_size a multiple of 256, not {block_size}"
            if block_size % 256
            else f"flash-attn serves float16/bfloat16, not {dtype}" if dtype not in (torch.float16, torch.bfloat16)
            else None
        )  # fmt: skip
        checks["flex"] = (
            f"flex_attention's kernels need engine.block_size a multiple of {FLEX_TILE}, not {block_size}"
            if block_size % FLEX_TILE
            else None
        )
    else:
        checks["flash_attn"] = f"flash-attn runs on CUDA, not {device}"
        # eager flex_attention (off CUDA) is exact but evaluates its masks over the whole pool: forced only (tests)
        checks["flex"] = None if wanted == "flex" else f"flex_attention is fused on CUDA only, not on {device}"
        checks["cpu"] = None if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else (
            f"the cpu kernel serves float32 and bfloat16 on the CPU, not {dtype} on {device}"
        )  # fmt: skip
    checks["portable"] = None
    if wanted != "auto":
        problem = checks.get(wanted, f"the {wanted} backend serves the CPU, not {device}")
        if problem is not None:
            raise ValueError(f"attention backend {wanted}: {problem}")
        return wanted, []
    reasons: list[str] = []
    for name, problem in checks.items():
        if problem is None:
            return name, reasons
        reasons.append(f"{name}: {problem}")
    raise AssertionError("portable serves every device")  # pragma: no cover


def installed_packages() -> set[str]:
    """The optional attention packages importable here (found, not imported)."""
    import importlib.util

    return {name for name in ("flash_attn",) if importlib.util.find_spec(name) is not None}


def select_backend(block_size: int, num_blocks: int, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The fastest backend that serves this device and dtype (`SESSIONSERVE_ATTENTION` forces one) for a pool of
    `num_blocks` blocks. The CPU kernel that fails to build falls back to portable unless it was forced."""
    wanted = os.environ.get("SESSIONSERVE_ATTENTION", "auto")
    name, reasons = choose_backend(device, dtype, block_size, installed_packages(), wanted)
    for reason in reasons:
        log.info("attention backend not chosen: %s", reason)
    try:
        return make_backend(name, block_size, num_blocks, device)
    except Exception as error:  # the CPU kernel did not build (no compiler): serve anyway, slower
        if name != "cpu" or wanted == "cpu":
            raise
        log.warning("the CPU paged-attention kernel did not build (%s); using the portable backend", error)
        return PortableBackend(block_size)


def make_backend(name: str, block_size: int, num_blocks: int, device: torch.device) -> AttentionBackend:
    """The backend called `name` (importing its module only now: flash-attn and the kernels are optional)."""
    if name == "cpu":
        from serving.engine.cpu_attention import CpuPagedBackend

        return CpuPagedBackend(block_size)
    if name == "flex":
        from serving.engine.flex_attention import FlexPagedBackend

        return FlexPagedBackend(block_size, num_blocks, compiled=device.type == "cuda")
    if name == "flash_attn":
        from serving.engine.flash_attention import FlashAttnPagedBackend

        return FlashAttnPagedBackend(block_size)
    if name == "portable":
        return PortableBackend(block_size)
    raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(BACKENDS[1:])}")
