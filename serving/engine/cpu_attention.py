"""`CpuPagedBackend`: attention that reads the KV pool where it lies, through a small C++ kernel (CPU; float32 or
bfloat16 storage, fp32 arithmetic).

csrc/paged_attention.cpp is built once per machine and source version with torch.utils.cpp_extension (seconds;
cached under torch's extensions directory, in a folder named after the source's hash so that checkouts with
different sources never load each other's build) and registered as `torch.ops.sessionserve.paged_attention`. It
serves decode rows and prefill chunks over a cached prefix with no gathered copy: each (sequence, kv heads, tile
of query rows) walks its block table once for all query heads sharing those kv heads (every kv head, so that a
block is read as contiguous runs, unless that leaves too few items for the threads), with an online softmax per
block in vector registers, causal, sliding window and soft-capping included, prefetching blocks ahead. Blocks
are kept head-major, keys transposed (`pool_views`), so a block's scores need no horizontal sums. A chunk
with no cached prefix attends only its own fresh K/V, which torch SDPA does best (unless the layer is soft-capped).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from serving.engine.attention_backend import (
    AttentionBackend,
    KVPair,
    LayerAttention,
    LayerTensors,
    StepSequence,
    causal_mask,
)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# fast-math lets gcc vectorize exp and the dot-product reductions; infinities stay meaningful (masked scores)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


@functools.cache
def load_kernel() -> Any:
    """Build (first time on this machine) and load the kernel; returns the op. Raises if it cannot be built."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    load(
        name=f"sessionserve_paged_attention_{digest}",
        sources=[str(SOURCE)],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.sessionserve.paged_attention


@dataclass(slots=True)
class _Paged:
    block_tables: torch.Tensor  # [sequences, max_blocks] int32, padded with block 0
    info: torch.Tensor  # [sequences, 3] int32: first row, rows, context


@dataclass(slots=True)
class _CpuMetadata:
    every: _Paged | None  # every sequence through the kernel (soft-capped layers)
    cached: _Paged | None  # decodes and chunks over a cached prefix
    fresh: list[StepSequence]  # chunks with no cached prefix: SDPA over their own K/V
    device: torch.device
    masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)
    write_index: tuple[torch.Tensor, torch.Tensor] | None = None  # flat K elements, V rows (set by the first write)


def _paged(sequences: list[StepSequence], block_size: int, device: torch.device) -> _Paged | None:
    if not sequences:
        return None
    width = max(-(-s.context // block_size) for s in sequences)
    tables = [s.block_ids[:width] + [0] * (width - len(s.block_ids[:width])) for s in sequences]
    info = [(s.start, s.rows, s.context) for s in sequences]
    return _Paged(
        torch.tensor(tables, dtype=torch.int32, device=device), torch.tensor(info, dtype=torch.int32, device=device)
    )


class CpuPagedBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, block_size: int) -> None:
        self._op = load_kernel()
        self.block_size = block_size

    def pool_views(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-major blocks, so that a kv head's part of a block is one contiguous run: keys transposed,
        [num_blocks, kv_heads, head_dim, block_size] (a block's scores are then head_dim vector FMAs over its keys,
        no horizontal sums), values [num_blocks, kv_heads, block_size, head_dim]."""
        blocks, block_size, kv_heads, head_dim = keys.shape
        return keys.view(blocks, kv_heads, head_dim, block_size), values.view(blocks, kv_heads, block_size, head_dim)

    def write(self, pool: KVPair, fresh: KVPair, slots: torch.Tensor, metadata: Any) -> None:
        """index_copy_ into flat views at indices computed once per step (index_put_ on the permuted views is
        as exact but erratic: tens of microseconds to milliseconds on a loaded machine)."""
        (key_pool, value_pool), (key, value) = pool, fresh
        meta: _CpuMetadata = metadata
        _, kv_heads, head_dim, block_size = key_pool.shape
        if meta.write_index is None:
            rows = (slots // block_size * kv_heads)[:, None] + torch.arange(kv_heads, device=slots.device)[None, :]
            offsets = (slots % block_size)[:, None]
            value_rows = rows * block_size + offsets  # [tokens, kv_heads] rows of [blocks * kv_heads * block_size, dim]
            dims = torch.arange(head_dim, device=slots.device)[None, None, :]
            key_elements = (rows[:, :, None] * head_dim + dims) * block_size + offsets[:, :, None]
            meta.write_index = (key_elements.reshape(-1), value_rows.reshape(-1))
        key_index, value_index = meta.write_index
        key_pool.view(-1).index_copy_(0, key_index, key[0].transpose(0, 1).reshape(-1))
        value_pool.view(-1, head_dim).index_copy_(0, value_index, value[0].transpose(0, 1).reshape(-1, head_dim))

    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> _CpuMetadata:
        fresh = [s for s in sequences if s.fresh and s.rows > 1]
        cached = [s for s in sequences if not (s.fresh and s.rows > 1)]
        block_size = self.block_size
        return _CpuMetadata(
            every=_paged(sequences, block_size, device) if fresh else None,
            cached=_paged(cached, block_size, device),
            fresh=fresh,
            device=device,
        )

    def forward(self, tensors: LayerTensors, metadata: Any, layer: LayerAttention, scaling: float) -> torch.Tensor:
        query, key, value, key_pool, value_pool = tensors
        meta: _CpuMetadata = metadata
        _, heads, rows, head_dim = query.shape
        out = query.new_empty(rows, heads, head_dim)
        q = query[0].transpose(0, 1)  # [rows, heads, head_dim], a view
        window, softcap = layer.window or 0, layer.softcap or 0.0
        paged = meta.every if layer.softcap is not None and meta.every is not None else meta.cached
        if paged is not None:
            self._op(out, q, key_pool, value_pool, paged.block_tables, paged.info, scaling, window, softcap)
        if paged is meta.every:
            return out
        kv_heads = key.shape[1]
        for index, chunk in enumerate(meta.fresh):
            rows_ = slice(chunk.start, chunk.start + chunk.rows)
            mask = None
            if layer.window is not None and chunk.rows > layer.window:
                mask_key = (index, layer.window)
                if mask_key not in meta.masks:
                    meta.masks[mask_key] = causal_mask(chunk.rows, chunk.rows, layer.window, meta.device)
                mask = meta.masks[mask_key]
            o = F.scaled_dot_product_attention(
                query[:, :, rows_],
                key[:, :, rows_],
                value[:, :, rows_],
                attn_mask=mask,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=heads != kv_heads,
            )
            out[rows_] = o[0].transpose(0, 1)
        return out
