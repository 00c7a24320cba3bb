"""`FlexPagedBackend`: torch's flex_attention reading the KV pool where it lies, through a paged block mask.

Each layer's pool is handed to flex_attention as one long sequence: `[1, kv_heads, num_blocks * block_size,
head_dim]`, a strided view of the engine's `[num_blocks, block_size, kv_heads, head_dim]` tensor (no copy). A
`BlockMask` built from the step's block tables (`BlockMask.from_kv_blocks`, KV tile = one pool block) tells the
kernel which pool blocks each query tile reads, so it visits only the sequence's own blocks: blocks every row of
the tile sees whole ("full": no mask evaluated) and edge blocks (causal edge, window edge, unwritten tail), where a
`mask_mod` maps a pool slot back to its position in the sequence (`logical`: pool block -> index in the table).
Soft-capping is a `score_mod`.

Decode rows go through one call (batch = sequences, one query row each, the pool broadcast over the batch);
each prefill chunk through a call of its own. On CUDA the call is `torch.compile`d (Triton kernels: flex
decoding for one-row queries); elsewhere it runs eagerly, where torch evaluates the mask_mod densely over the
pool: exact but slow, so `select_backend` picks it on the CUDA only. The CPU tests check both the eager path and
the compiled CPU kernel (static shapes), which reads only the listed blocks, against the portable backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from serving.engine.attention_backend import AttentionBackend, LayerAttention, LayerTensors, StepSequence

Q_TILE = 128  # query rows per block-mask tile (flex_attention's default sparse block size)


@functools.cache
def _compiled(dynamic: bool) -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (the fused kernels exist only compiled). CUDA compiles for
    dynamic shapes (batch sizes and chunk lengths vary every step); torch 2.13's CPU template builds only static
    shapes, which is enough for the tests."""
    return cast(Callable[..., torch.Tensor], torch.compile(flex_attention, dynamic=dynamic))


@dataclass(slots=True)
class _Group:
    """Sequences sharing one flex call: `rows` query rows each, at `starts` in the flattened batch."""

    starts: list[int]
    rows: int
    logical: torch.Tensor  # [batch, num_pool_blocks] long: index of each pool block in the table, -1 if absent
    first_position: torch.Tensor  # [batch] long: position of each sequence's first query row
    tables: torch.Tensor  # [batch, max_blocks] long: block tables, padded with block 0
    lengths: torch.Tensor  # [batch] long: blocks in each table


@dataclass(slots=True)
class _FlexMetadata:
    groups: list[_Group]
    masks: dict[tuple[int, int | None], BlockMask]  # (group, window) -> its block mask, built once per step


class FlexPagedBackend(AttentionBackend):
    name = "flex"

    def __init__(self, block_size: int, num_blocks: int, compiled: bool, dynamic: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks  # pool blocks: the flat KV length is num_blocks * block_size
        self._attend = _compiled(dynamic) if compiled else cast(Callable[..., torch.Tensor], flex_attention)

    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> _FlexMetadata:
        decodes = [s for s in sequences if s.rows == 1]
        groups = [self._group(decodes, device)] if decodes else []
        groups += [self._group([s], device) for s in sequences if s.rows > 1]
        return _FlexMetadata(groups, {})

    def _group(self, members: list[StepSequence], device: torch.device) -> _Group:
        width = max(len(s.block_ids) for s in members)
        tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in members], dtype=torch.long)
        lengths = torch.tensor([len(s.block_ids) for s in members], dtype=torch.long)
        logical = torch.full((len(members), self.num_blocks), -1, dtype=torch.long)
        for b, seq in enumerate(members):
            logical[b, tables[b, : len(seq.block_ids)]] = torch.arange(len(seq.block_ids))
        return _Group(
            starts=[s.start for s in members],
            rows=members[0].rows,
            logical=logical.to(device),
            first_position=torch.tensor([s.context - s.rows for s in members], dtype=torch.long, device=device),
            tables=tables.to(device),
            lengths=lengths.to(device),
        )

    def block_lists(self, group: _Group, window: int | None) -> tuple[torch.Tensor, ...]:
        """(partial counts, partial indices, full counts, full indices) per (sequence, query tile): the pool
        blocks the tile must read with the mask_mod applied (causal edge, window edge, unwritten tail), and those
        every row of the tile attends whole (no mask_mod: the kernel skips it). Indices are padded to the pool's
        width (compiled kernels size the KV extent by it), each list in table order."""
        block_size, device = self.block_size, group.tables.device
        q_tiles = -(-group.rows // Q_TILE)
        tile = torch.arange(q_tiles, device=device)
        tile_first = group.first_position[:, None] + tile * Q_TILE  # [batch, tiles]: positions of a tile's rows
        tile_last = group.first_position[:, None] + torch.clamp((tile + 1) * Q_TILE, max=group.rows) - 1
        block = torch.arange(group.tables.shape[1], device=device)
        block_first, block_last = block * block_size, block * block_size + block_size - 1  # [blocks]
        in_table = (block[None, :] < group.lengths[:, None])[:, None, :]  # [batch, 1, blocks]
        needed = in_table & (block_first <= tile_last[..., None])
        full = in_table & (block_last <= tile_first[..., None])
        if window is not None:
            needed &= block_last > tile_first[..., None] - window
            full &= block_first > tile_last[..., None] - window
        partial = needed & ~full
        lists = []
        for chosen in (partial, full):
            order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)  # chosen blocks first, in order
            physical = group.tables[:, None, :].expand_as(chosen).gather(-1, order).to(torch.int32)
            indices = torch.zeros(*chosen.shape[:2], self.num_blocks, dtype=torch.int32, device=device)
            indices[..., : physical.shape[-1]] = physical
            lists += [chosen.sum(-1, dtype=torch.int32)[:, None], indices[:, None]]
        return tuple(lists)

    def _block_mask(self, group: _Group, window: int | None) -> BlockMask:
        block_size, logical, first_position = self.block_size, group.logical, group.first_position

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            index = logical[b, kv_idx // block_size]
            key_position = index * block_size + kv_idx % block_size
            query_position = first_position[b] + q_idx
            allowed = (index >= 0) & (key_position <= query_position)
            if window is not None:
                allowed = allowed & (key_position > query_position - window)
            return allowed

        counts, indices, full_counts, full_indices = self.block_lists(group, window)
        return BlockMask.from_kv_blocks(
            counts,
            indices,
            full_counts,
            full_indices,
            BLOCK_SIZE=(Q_TILE, block_size),
            mask_mod=mask_mod,
            seq_lengths=(group.rows, self.num_blocks * block_size),
            compute_q_blocks=False,  # only the backward pass reads them
        )

    def forward(self, tensors: LayerTensors, metadata: Any, layer: LayerAttention, scaling: float) -> torch.Tensor:
        query, _, _, key_pool, value_pool = tensors
        meta: _FlexMetadata = metadata
        _, heads, rows, head_dim = query.shape
        kv_heads = key_pool.shape[2]
        keys = key_pool.view(1, -1, kv_heads, head_dim).transpose(1, 2)  # [1, kv_heads, slots, dim], no copy
        values = value_pool.view(1, -1, kv_heads, head_dim).transpose(1, 2)
        score_mod = _softcap(layer.softcap) if layer.softcap is not None else None
        out = query.new_empty(rows, heads, head_dim)
        for index, group in enumerate(meta.groups):
            mask_key = (index, layer.window)
            if mask_key not in meta.masks:
                meta.masks[mask_key] = self._block_mask(group, layer.window)
            if group.rows == 1:  # decodes: [sequences, heads, 1, dim]
                rows_ = torch.tensor(group.starts, device=query.device)
                q = query[0].index_select(1, rows_).transpose(0, 1).unsqueeze(2)
            else:
                q = query[:, :, group.starts[0] : group.starts[0] + group.rows]
            o = self._attend(
                q, keys, values, score_mod=score_mod, block_mask=meta.masks[mask_key], scale=scaling,
                enable_gqa=heads != kv_heads,
            )  # fmt: skip
            if group.rows == 1:
                out[rows_] = o[:, :, 0]
            else:
                out[group.starts[0] : group.starts[0] + group.rows] = o[0].transpose(0, 1)
        return out


def _softcap(cap: float) -> Callable[..., torch.Tensor]:
    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    return score_mod
