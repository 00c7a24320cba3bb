"""Paged attention plugged into unmodified transformers models.

The model runs on one flattened row of tokens (`[1, T]`, explicit position_ids): first one token per decoding
sequence, then each prefilling sequence's chunk. Two pieces plug in without forking modeling code:

- `PagedKVCache` (a transformers `Cache`): the model calls `update(k, v, layer_idx)`; it writes the new K/V into
  the pool at the step's slot mapping and hands the fresh K/V back unchanged.
- `paged_attention_forward`, registered with `AttentionInterface` as "sessionserve_paged": hands the layer's
  queries and pool tensors to the step's attention backend (attention_backend.py: the interface, the portable
  gather + SDPA implementation; cpu_attention.py: a kernel reading the blocks in place), with the layer's sliding
  window and soft-capping from `check_supported`. Without batch metadata in its kwargs it is plain SDPA, so
  `generate` still works.

The pool is one tensor `[layers, 2, num_blocks, block_size, kv_heads, head_dim]` (layer-major so a block moves
between tiers in one indexing op for all layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn, cast

import torch
from transformers import AttentionInterface, Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from serving.engine.attention_backend import AttentionBackend, KVPair, LayerAttention, LayerTensors, attend

ATTENTION_NAME = "sessionserve_paged"


@dataclass(slots=True)
class PagedBatch:
    """Per-step attention state, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] pool slot (block * block_size + offset) where each row's K/V is written
    backend: AttentionBackend
    metadata: Any  # what `backend.prepare` built for this step
    layers: list[LayerAttention]  # per layer: window, soft-capping
    cache: PagedKVCache


class _PagedLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]  # transformers' class is untyped
    """One layer's view of the pool; transformers' mask helpers only ask it whether it is sliding."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys, self.values, self.is_initialized = keys, values, True
        self.key_pool, self.value_pool = keys, values  # the same tensors, typed, in the backend's layout

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
    def __init__(self, kv: torch.Tensor, backend: AttentionBackend) -> None:
        self.backend = backend
        self.pool_layers = [_PagedLayer(*backend.pool_views(kv[i, 0], kv[i, 1])) for i in range(kv.shape[0])]
        super().__init__(layers=cast(Any, self.pool_layers))  # transformers types it as a wider invariant list
        self.batch: PagedBatch | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V ([1, kv_heads, T, head_dim]) into the pool; return them unchanged."""
        layer = self.pool_layers[layer_idx]
        assert self.batch is not None, "the model runner sets the batch around each forward pass"
        batch = self.batch
        pool, fresh = KVPair(layer.key_pool, layer.value_pool), KVPair(key_states, value_states)
        self.backend.write(pool, fresh, batch.slot_mapping, batch.metadata)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    """[batch, rows, heads, dim], like transformers' eager attention with soft-capping."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 where attended
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return attend(query, key, value, mask, scale, softcap).transpose(1, 2).contiguous()


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
    if batch is None and kwargs.get("softcap") is not None:  # generate on a soft-capped model: the math path
        return _softcapped_attention(query, key, value, attention_mask, scaling, kwargs["softcap"]), None
    if batch is None:  # not an engine step (e.g. generate on the same model): plain SDPA
        output: tuple[torch.Tensor, None] = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
        return output
    layer_idx = cast(int, module.layer_idx)
    layer = batch.cache.pool_layers[layer_idx]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    tensors = LayerTensors(query, key, value, layer.key_pool, layer.value_pool)
    out = batch.backend.forward(tensors, batch.metadata, batch.layers[layer_idx], scaling)
    return out.unsqueeze(0), None


def register() -> None:
    """Make "sessionserve_paged" a valid attention implementation (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)  # masks for the plain-SDPA fallback


def check_supported(model: PreTrainedModel) -> list[LayerAttention]:
    """Raise ValueError for architectures this attention would serve wrongly; return each layer's attention facts.

    Sliding layers attend to the last `sliding_window` tokens (the masks transformers builds for the same model:
    per `layer_types`, or every layer when a config without layer types has a window); soft-capping applies to
    every layer, as in the model's own eager attention.
    """
    config = model.config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{name} does not route attention through transformers' AttentionInterface")
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise ValueError(f"{name}: only decoder-only causal language models are supported")
    for attribute in ("kv_lora_rank", "attention_chunk_size", "use_alibi", "alibi", "use_bidirectional_attention"):
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
    window: int | None = getattr(config, "sliding_window", None)
    if getattr(config, "layer_types", None) is None:
        sliding = [window is not None] * config.num_hidden_layers
    else:
        sliding = [kind == "sliding_attention" for kind in layer_types]
    if any(sliding) and not window:
        raise ValueError(f"{name}: sliding-window layers without a window size")
    softcap = getattr(config, "attn_logit_softcapping", None)
    layers = [LayerAttention(window if s else None, float(softcap) if softcap else None) for s in sliding]
    for module in attention_layers:  # where the module states its own window, it must agree with the masks
        own = getattr(module, "sliding_window", "unset")
        if own != "unset" and (own or None) != layers[cast(int, module.layer_idx)].window:
            raise ValueError(f"{name}: layer {module.layer_idx} has an unexpected sliding window {own}")
    return layers
