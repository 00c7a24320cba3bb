"""`FlashAttnPagedBackend`: flash-attn's `flash_attn_with_kvcache` reading the pool through block tables (CUDA).

The engine's pool layout `[num_blocks, block_size, kv_heads, head_dim]` is flash-attn's paged KV cache as it is;
its kernel needs pages of a multiple of 256 tokens (`engine.block_size`), fp16/bf16 and a CUDA device, which
`select_backend` checks before choosing it. The step's K/V is already in the pool (the default `write`), so the
kernel is called without new K/V: decode rows in one call (batch = sequences, one query row each), each prefill
chunk in a call of its own; with `causal=True` flash-attn aligns the queries to the end of the context.

Not verified here (no GPU, no flash-attn wheel on the CPU machine): `kernel_arguments` is unit-tested, the call
itself runs only in the gpu-marked tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from serving.engine.attention_backend import AttentionBackend, LayerAttention, LayerTensors, StepSequence

PAGE_MULTIPLE = 256  # flash-attn's paged KV: page_block_size must be divisible by 256


def kernel_arguments(layer: LayerAttention, scaling: float) -> dict[str, Any]:
    """flash-attn's keyword arguments for a layer: its window (left, right) counts keys *before* the query, so
    our window of `w` keys (the query's own included) is (w - 1, 0); no window is (-1, -1); no soft-cap is 0."""
    return {
        "softmax_scale": scaling,
        "causal": True,
        "window_size": (layer.window - 1, 0) if layer.window is not None else (-1, -1),
        "softcap": layer.softcap or 0.0,
    }


@dataclass(slots=True)
class _Call:
    starts: list[int]  # first row of each sequence in the flattened batch
    rows: int  # query rows per sequence (1 for the decode call)
    cache_seqlens: torch.Tensor  # [batch] int32: context after this step
    block_table: torch.Tensor  # [batch, max_blocks] int32, padded with block 0


class FlashAttnPagedBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self, block_size: int) -> None:
        if block_size % PAGE_MULTIPLE:
            raise ValueError(f"flash-attn's paged KV needs engine.block_size a multiple of 256, not {block_size}")
        from flash_attn import flash_attn_with_kvcache  # the optional CUDA package, imported when chosen

        self._kernel = flash_attn_with_kvcache
        self.block_size = block_size

    def prepare(self, sequences: list[StepSequence], num_rows: int, device: torch.device) -> list[_Call]:
        decodes = [s for s in sequences if s.rows == 1]
        calls = [self._call(decodes, device)] if decodes else []
        return calls + [self._call([s], device) for s in sequences if s.rows > 1]

    @staticmethod
    def _call(members: list[StepSequence], device: torch.device) -> _Call:
        width = max(len(s.block_ids) for s in members)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in members]
        return _Call(
            starts=[s.start for s in members],
            rows=members[0].rows,
            cache_seqlens=torch.tensor([s.context for s in members], dtype=torch.int32, device=device),
            block_table=torch.tensor(tables, dtype=torch.int32, device=device),
        )

    def forward(self, tensors: LayerTensors, metadata: Any, layer: LayerAttention, scaling: float) -> torch.Tensor:
        query, _, _, key_pool, value_pool = tensors
        calls: list[_Call] = metadata
        _, heads, rows, head_dim = query.shape
        out = query.new_empty(rows, heads, head_dim)
        arguments = kernel_arguments(layer, scaling)
        q_all = query[0].transpose(0, 1)  # [rows, heads, dim]
        for call in calls:
            if call.rows == 1:
                q = q_all[call.starts[0] : call.starts[0] + len(call.starts)].unsqueeze(1)  # decodes lead the batch
            else:
                q = q_all[call.starts[0] : call.starts[0] + call.rows].unsqueeze(0)
            o = self._kernel(
                q.contiguous(), key_pool, value_pool, cache_seqlens=call.cache_seqlens, block_table=call.block_table,
                **arguments,
            )  # fmt: skip
            if call.rows == 1:
                out[call.starts[0] : call.starts[0] + len(call.starts)] = o[:, 0]
            else:
                out[call.starts[0] : call.starts[0] + call.rows] = o[0]
        return out
