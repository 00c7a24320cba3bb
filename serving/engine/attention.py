"""Paged attention plugged into unmodified transformers models.

The model runs on one flattened row of tokens (`[1, T]`, explicit position_ids): first one token per decoding
sequence, then each prefilling sequence's chunk. Two pieces plug in without forking modeling code:

- `PagedKVCache` (a transformers `Cache`): the model calls `update(k, v, layer_idx)`; it writes the new K/V into
  the pool at the step's slot mapping and hands the fresh K/V back unchanged.
- `paged_attention_forward`, registered with `AttentionInterface` as "sessionserve_paged": reads each sequence's
  K/V from the pool by its block table and runs torch SDPA: one call for all single-token rows of similar
  context length (keys padded to the group's longest context, boolean mask, query heads folded onto their KV
  head so no repeat_kv copy; groups keep padding under 2x when contexts differ widely), plus one call per
  prefill chunk. Without batch metadata in its kwargs it is plain SDPA, so `generate` still works.

The pool is one tensor `[layers, 2, num_blocks, block_size, kv_heads, head_dim]` (layer-major so a block moves
between tiers in one indexing op for all layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "sessionserve_paged"


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flattened batch
    length: int  # rows (new tokens) in the chunk
    context: int  # tokens the chunk attends to: cached + new
    block_ids: torch.Tensor  # [ceil(context / block_size)] device block table
    mask: torch.Tensor | None  # [length, context] bool, None when the chunk is the whole context (plain causal)


@dataclass(slots=True)
class DecodeGroup:
    """Consecutive single-token rows of similar context length, attended in one SDPA call."""

    start: int  # first row of the group in the flattened batch
    count: int  # rows (sequences) in the group
    context: int  # longest context in the group
    block_tables: torch.Tensor  # [count, max_blocks], padded with block 0
    mask: torch.Tensor | None  # [count, 1, 1, max_blocks * block_size] True where attended; None: one row


@dataclass(slots=True)
class PagedBatch:
    """Per-step attention metadata, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] pool slot (block * block_size + offset) where each row's K/V is written
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    cache: PagedKVCache


class _PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]  # transformers' class is untyped
    """One layer's view of the pool; transformers' mask helpers only ask it whether it is sliding."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys, self.values, self.is_initialized = keys, values, True
        self.key_pool, self.value_pool = keys, values  # the same tensors, typed: [blocks, block_size, heads, dim]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # pool tensors exist from the start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("PagedKVCache.update writes the pool")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("paged attention builds its own masks")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class PagedKVCache(Cache):
    def __init__(self, kv: torch.Tensor) -> None:
        self.pool_layers = [_PagedLayer(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])]
        super().__init__(layers=cast(Any, self.pool_layers))  # transformers types it as a wider invariant list
        self.batch: PagedBatch | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V ([1, kv_heads, T, head_dim]) into the pool; return them unchanged."""
        layer = self.pool_layers[layer_idx]
        assert self.batch is not None, "the model runner sets the batch around each forward pass"
        slots = self.batch.slot_mapping
        keys, values = layer.key_pool, layer.value_pool
        keys.view(-1, *keys.shape[2:]).index_copy_(0, slots, key_states[0].transpose(0, 1))
        values.view(-1, *values.shape[2:]).index_copy_(0, slots, value_states[0].transpose(0, 1))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _gather(pool: torch.Tensor, block_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, kv_heads, blocks * block_size, head_dim] (a strided view of one gather copy)."""
    return pool.index_select(0, block_ids.reshape(-1)).view(rows, -1, *pool.shape[2:]).transpose(1, 2)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch: PagedBatch | None = kwargs.pop("paged_batch", None)
    if batch is None:  # not an engine step (e.g. generate on the same model): plain SDPA
        output: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
        return output
    _, heads, rows, head_dim = query.shape
    kv_heads = key.shape[1]
    layer = batch.cache.pool_layers[cast(int, module.layer_idx)]
    out = query.new_empty(rows, heads, head_dim)
    for group in batch.decodes:
        rows_ = slice(group.start, group.start + group.count)
        q = query[0, :, rows_].transpose(0, 1).reshape(group.count, kv_heads, heads // kv_heads, head_dim)
        k = _gather(layer.key_pool, group.block_tables, group.count)
        v = _gather(layer.value_pool, group.block_tables, group.count)
        if group.mask is None:
            k, v = k[:, :, : group.context], v[:, :, : group.context]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask, scale=scaling)
        out[rows_] = o.reshape(group.count, heads, head_dim)
    for chunk in batch.prefills:
        rows_ = slice(chunk.start, chunk.start + chunk.length)
        q = query[:, :, rows_]
        if chunk.mask is None:  # the chunk is the whole context: use its fresh K/V, plain causal
            k, v = key[:, :, rows_], value[:, :, rows_]
        else:
            k = _gather(layer.key_pool, chunk.block_ids, 1)[:, :, : chunk.context]
            v = _gather(layer.value_pool, chunk.block_ids, 1)[:, :, : chunk.context]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scaling, enable_gqa=heads != kv_heads
        )
        out[rows_] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Make "sessionserve_paged" a valid attention implementation (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)  # masks for the plain-SDPA fallback


def check_supported(model: PreTrainedModel) -> int | None:
    """Raise ValueError for architectures this attention would serve wrongly; return a context cap or None.

    Sliding-window layers are exact while every sequence fits in the window, so the window caps the context.
    """
    config = model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not route attention through transformers' AttentionInterface")
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise ValueError(f"{name}: only decoder-only causal language models are supported")
    for attribute in ("attn_logit_softcapping", "kv_lora_rank", "attention_chunk_size", "use_alibi", "alibi"):
        if getattr(config, attribute, None):
            raise ValueError(f"{name}: attention with {attribute} is not supported by the paged engine")
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"{name}: layer types {sorted(unknown)} are not supported by the paged engine")
    attention_layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if len(attention_layers) != config.num_hidden_layers:
        raise ValueError(f"{name}: expected {config.num_hidden_layers} attention modules with layer_idx")
    if any(hasattr(m, "sinks") for m in attention_layers):
        raise ValueError(f"{name}: attention sinks are not supported by the paged engine")
    window = getattr(config, "sliding_window", None)
    uses_window = "sliding_attention" in layer_types or (
        getattr(config, "layer_types", None) is None and window is not None
    )
    if uses_window and getattr(config, "use_sliding_window", True) is not False:
        if not window:
            raise ValueError(f"{name}: sliding-window layers without a window size")
        return int(window)
    return None
