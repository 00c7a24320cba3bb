"""The only engine component with tensors: the model, the KV pool of each tier, one forward pass per step."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from serving.config import EngineConfig
from serving.engine.attention import ATTENTION_NAME, PagedBatch, PagedKVCache, check_supported, register
from serving.engine.attention_backend import AttentionBackend, StepSequence, select_backend
from serving.engine.kv_cache_manager import BlockPairs
from serving.engine.request import Request
from serving.engine.sampler import sample
from serving.engine.scheduler import SchedulerOutput
from serving.engine.types import KVTier
from serving.models import LoadedModel

log = logging.getLogger(__name__)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A zeroed tensor; on the CPU through calloc, so untouched pages of a large pool cost no memory yet."""
    if device.type != "cpu" or pin or math.prod(shape) == 0:  # numpy cannot view an empty buffer as `dtype`
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def kv_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


@dataclass(slots=True)
class StepInputs:
    """What one forward pass takes, built from the scheduler's output."""

    input_ids: torch.Tensor  # [1, tokens]: every request's new tokens on one flattened row
    position_ids: torch.Tensor  # [1, tokens]: each token's position in its own sequence
    batch: PagedBatch  # where each token's KV goes and which blocks each row attends to
    logits_rows: torch.Tensor  # rows whose logits are sampled (the last token of a finished chunk)
    sampled_requests: list[Request]  # the requests those rows belong to, in the same order


# Engines sharing a model (tests, benchmarks) -> (how many, the attention implementation to give back).
_ENGINES_ON_MODEL: WeakKeyDictionary[PreTrainedModel, tuple[int, str]] = WeakKeyDictionary()


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, backend: AttentionBackend | None = None) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = config.block_size
        self.layers = check_supported(self.model)  # raises ValueError for what cannot be served exactly
        layers, kv_heads, head_dim = kv_shape(self.model.config)
        self.bytes_per_block = self.block_bytes(loaded, config)
        self.num_device_blocks = self.device_blocks(loaded, config)
        self.num_host_blocks = config.host_cache_memory // self.bytes_per_block
        if self.num_device_blocks < 1:
            raise ValueError(f"kv_cache_memory {config.kv_cache_memory} B holds no block of {self.bytes_per_block} B")
        self.backend: AttentionBackend = backend or select_backend(
            config.block_size, self.num_device_blocks, self.device, loaded.dtype
        )
        log.info("paged attention backend: %s", self.backend.name)
        shape = (layers, 2, self.num_device_blocks, config.block_size, kv_heads, head_dim)
        self.kv_pool = zeros(shape, loaded.dtype, self.device)
        host_shape = (layers, 2, self.num_host_blocks, config.block_size, kv_heads, head_dim)
        self.host_kv_pool = zeros(host_shape, loaded.dtype, torch.device("cpu"), pin=self.device.type == "cuda")
        self.cache: PagedKVCache | None = PagedKVCache(self.kv_pool, self.backend)
        self._use_paged_attention()
        self._skip_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # 4D: transformers keeps it
        self.timings = {"prepare_s": 0.0, "forward_s": 0.0, "sample_s": 0.0, "copy_s": 0.0}
        self.last_step = (0.0, 0.0, 0.0)  # prepare, forward, sample seconds of the latest execute()

    @staticmethod
    def block_bytes(loaded: LoadedModel, config: EngineConfig) -> int:
        """Bytes of one KV block (all layers, K and V)."""
        layers, kv_heads, head_dim = kv_shape(loaded.model.config)
        return layers * 2 * config.block_size * kv_heads * head_dim * loaded.dtype.itemsize

    @staticmethod
    def device_blocks(loaded: LoadedModel, config: EngineConfig) -> int:
        """Blocks in the device pool (what a backend built outside the runner must know)."""
        return config.kv_cache_memory // ModelRunner.block_bytes(loaded, config)

    def _use_paged_attention(self) -> None:
        """Switch the model to paged attention (plain SDPA when called outside an engine step)."""
        register()
        users, original = _ENGINES_ON_MODEL.get(self.model, (0, self.model.config._attn_implementation))
        if not users:
            self.model.set_attn_implementation(ATTENTION_NAME)
            if self.model.config._attn_implementation != ATTENTION_NAME:
                raise ValueError(f"{type(self.model).__name__} cannot switch its attention implementation")
        _ENGINES_ON_MODEL[self.model] = (users + 1, original)

    def close(self) -> None:
        """Drop the pools; the last engine on this model gives it its own attention back."""
        users, original = _ENGINES_ON_MODEL.pop(self.model)
        if users > 1:
            _ENGINES_ON_MODEL[self.model] = (users - 1, original)
        else:
            self.model.set_attn_implementation(original)
        self.kv_pool = self.host_kv_pool = torch.empty(0)
        self.cache = None

    # ------------------------------------------------------------------------------ BlockCopier (tier moves)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, pairs: BlockPairs) -> None:
        if not pairs:
            return
        started = time.perf_counter()
        src_ids = torch.tensor([s for s, _ in pairs], device=src.device)
        dst_ids = torch.tensor([d for _, d in pairs], device=dst.device)
        to_device = src.device.type == "cpu" and dst.device.type != "cpu"
        if to_device and src.is_pinned():
            # Host -> device: gather the blocks straight into pinned staging (torch's caching host allocator, which
            # keeps it alive until the async copy that reads it is done), since a non_blocking copy from a pageable
            # index_select result would be synchronous; the copy and the index_copy_ after it are ordered on the
            # same CUDA stream.
            staging = torch.empty((*src.shape[:2], len(pairs), *src.shape[3:]), dtype=src.dtype, pin_memory=True)
            blocks = torch.index_select(src, 2, src_ids, out=staging).to(dst.device, non_blocking=True)
        else:
            blocks = src.index_select(2, src_ids)
            # Device -> host must block: index_copy_ below reads `blocks` on the CPU at once, and an async copy
            # would still be in flight (the race this guards against: reading a staging tensor not yet written).
            blocks = blocks.to(dst.device)
        dst.index_copy_(2, dst_ids, blocks)
        self.timings["copy_s"] += time.perf_counter() - started

    def swap_out(self, pairs: BlockPairs) -> None:
        self._copy(self.host_kv_pool, self.kv_pool, pairs)

    def swap_in(self, pairs: BlockPairs) -> None:
        self._copy(self.kv_pool, self.host_kv_pool, pairs)

    def copy(self, pairs: BlockPairs) -> None:
        self._copy(self.kv_pool, self.kv_pool, pairs)

    # ------------------------------------------------------------------------------ BlockIO (the disk tier)

    def gather(self, tier: KVTier, block_ids: list[int]) -> torch.Tensor:
        """A copy of blocks of the device or host pool, block-major on the CPU: [n, layers, 2, block, heads, dim]."""
        started = time.perf_counter()
        pool = self.kv_pool if tier == "device" else self.host_kv_pool
        blocks = pool.index_select(2, torch.tensor(block_ids, device=pool.device))
        blocks = blocks.permute(2, 0, 1, 3, 4, 5).contiguous().cpu()  # .cpu() waits for a device copy
        self.timings["copy_s"] += time.perf_counter() - started
        return blocks

    def scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write block-major `blocks` (from `gather` or a file) into device blocks `block_ids`."""
        started = time.perf_counter()
        ids = torch.tensor(block_ids, device=self.device)
        self.kv_pool.index_copy_(2, ids, blocks.to(self.device, self.kv_pool.dtype).permute(1, 2, 0, 3, 4, 5))
        self.timings["copy_s"] += time.perf_counter() - started

    # ------------------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run the step's tokens through the model; return {request_id: token} for requests that completed."""
        started = time.perf_counter()
        step = self._prepare(out)
        prepared = time.perf_counter()
        assert self.cache is not None, "execute() after close()"
        self.cache.batch = step.batch
        logits = self.model(
            input_ids=step.input_ids,
            position_ids=step.position_ids,
            past_key_values=self.cache,
            use_cache=True,
            attention_mask=self._skip_mask,
            logits_to_keep=step.logits_rows,
            paged_batch=step.batch,
        ).logits[0]
        self.cache.batch = None
        forwarded = time.perf_counter()
        tokens: dict[str, int] = {}
        if step.sampled_requests:
            params = [r.params for r in step.sampled_requests]
            generators = [r.generator for r in step.sampled_requests]
            sampled = sample(logits.float(), params, generators).tolist()
            tokens = {r.request_id: token for r, token in zip(step.sampled_requests, sampled, strict=True)}
        done = time.perf_counter()
        self.last_step = (prepared - started, forwarded - prepared, done - forwarded)
        self.timings["prepare_s"] += prepared - started
        self.timings["forward_s"] += forwarded - prepared
        self.timings["sample_s"] += done - forwarded
        return tokens

    def _prepare(self, out: SchedulerOutput) -> StepInputs:
        block_size = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled_requests: list[Request] = []
        sequences: list[StepSequence] = []
        # single-token rows first, shortest context first (so rows of similar length are consecutive)
        rows = sorted(
            zip(out.requests, out.num_tokens, strict=True), key=lambda r: (r[1] > 1, r[0].num_computed_tokens)
        )
        for request, n in rows:
            start, end, table = request.num_computed_tokens, request.num_computed_tokens + n, request.block_ids
            row = len(ids)
            ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            sequences.append(StepSequence(start=row, rows=n, context=end, block_ids=table[: -(-end // block_size)]))
            if end == request.num_tokens:
                logits_rows.append(row + n - 1)
                sampled_requests.append(request)
        assert self.cache is not None, "execute() after close()"
        batch = PagedBatch(
            slot_mapping=torch.tensor(slots, device=self.device),
            backend=self.backend,
            metadata=self.backend.prepare(sequences, len(ids), self.device),
            layers=self.layers,
            cache=self.cache,
        )
        return StepInputs(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            batch=batch,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            sampled_requests=sampled_requests,
        )
