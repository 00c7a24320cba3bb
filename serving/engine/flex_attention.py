"""`FlexPagedBackend`: torch's flex_attention reading the KV pool where it lies, through a paged block mask.

Each layer's pool is handed to flex_attention as one long sequence: `[1, kv_heads, num_blocks * block_size,
head_dim]`, a strided view of the engine's `[num_blocks, block_size, kv_heads, head_dim]` tensor (no copy). A
`BlockMask` built from the step's block tables (`BlockMask.from_kv_blocks`, KV tile = one pool block) tells the
kernel which pool blocks each query tile reads, so it visits only the sequence's own blocks; a `mask_mod` maps a
pool slot back to its position in the sequence (`logical`: pool block -> index in the block table) for causality,
the sliding window and the unwritten tail of the last block. Soft-capping is a `score_mod`.

Decode rows go through one call (batch = sequences, one query row each, the pool broadcast over the batch);
each prefill chunk through a call of its own. On CUDA the call is `torch.compile`d (Triton kernels: flex
decoding for one-row queries); elsewhere it runs eagerly, where torch evaluates the masks densely over the
pool: exact (the CPU tests check it against the portable backend) but slow, so `select_backend` never picks it
on the CPU.
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
def _compiled() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (the fused Triton kernels exist only compiled)."""
    return cast(Callable[..., torch.Tensor], torch.compile(flex_attention, dynamic=True))


@dataclass(slots=True)
class _Group:
    """Sequences sharing one flex call: `rows` query rows each, at `starts` in the flattened batch."""

    starts: list[int]
    rows: int
    logical: torch.Tensor  # [batch, num_pool_blocks] long: index of each pool block in the table, -1 if absent
    first_position: torch.Tensor  # [batch] long: position of each sequence's first query row
    kv_num_blocks: torch.Tensor  # [batch, 1, q_tiles] int32
    kv_indices: torch.Tensor  # [batch, 1, q_tiles, max_blocks] int32: pool blocks each query tile reads


@dataclass(slots=True)
class _FlexMetadata:
    groups: list[_Group]
    masks: dict[tuple[int, int | None], BlockMask]  # (group, window) -> its block mask, built once per step


class FlexPagedBackend(AttentionBackend):
    name = "flex"

    def __init__(self, block_size: int, num_blocks: int, compiled: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks  # pool blocks: the flat KV length is num_blocks * block_size
        self._attend = _compiled() if compiled else cast(Callable[..., torch.Tensor], flex_attention)

    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> _FlexMetadata:
        decodes = [s for s in sequences if s.rows == 1]
        groups = [self._group(decodes, device)] if decodes else []
        groups += [self._group([s], device) for s in sequences if s.rows > 1]
        return _FlexMetadata(groups, {})

    def _group(self, members: list[StepSequence], device: torch.device) -> _Group:
        block_size, rows = self.block_size, members[0].rows
        q_tiles = -(-rows // Q_TILE)
        logical = torch.full((len(members), self.num_blocks), -1, dtype=torch.long)
        # as wide as the pool, like torch's own paged helper: compiled kernels size the KV extent by it
        indices = torch.zeros(len(members), 1, q_tiles, self.num_blocks, dtype=torch.int32)
        counts = torch.zeros(len(members), 1, q_tiles, dtype=torch.int32)
        for b, seq in enumerate(members):
            blocks = torch.tensor(seq.block_ids, dtype=torch.long)
            logical[b, blocks] = torch.arange(len(seq.block_ids))
            indices[b, 0, :, : len(seq.block_ids)] = blocks.to(torch.int32)
            first = seq.context - seq.rows
            for tile in range(q_tiles):  # a tile reads blocks up to its last row's position (causal)
                last = first + min((tile + 1) * Q_TILE, rows) - 1
                counts[b, 0, tile] = last // block_size + 1
        first_position = torch.tensor([s.context - s.rows for s in members], dtype=torch.long)
        return _Group(
            starts=[s.start for s in members],
            rows=rows,
            logical=logical.to(device),
            first_position=first_position.to(device),
            kv_num_blocks=counts.to(device),
            kv_indices=indices.to(device),
        )

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

        return BlockMask.from_kv_blocks(
            group.kv_num_blocks,
            group.kv_indices,
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
