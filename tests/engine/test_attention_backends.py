"""Attention backends against a dense reference on random pools: decode rows, chunks over a cached prefix and
fresh chunks in one step, with sliding windows, soft-capping and grouped-query heads."""

from __future__ import annotations

import random

import pytest
import torch

from serving.engine.attention_backend import (
    KVPair,
    LayerAttention,
    LayerTensors,
    PortableBackend,
    StepSequence,
    attend,
    causal_mask,
)
from serving.engine.cpu_attention import CpuPagedBackend

BLOCK = 16


def dense_reference(query, keys, values, seq: StepSequence, layer: LayerAttention, scaling: float) -> torch.Tensor:
    """[rows, heads, dim] from the sequence's own dense K/V ([kv_heads, context, dim])."""
    q = query[:, :, seq.start : seq.start + seq.rows]
    mask = causal_mask(seq.rows, seq.context, layer.window, torch.device("cpu"))
    return attend(q, keys[None], values[None], mask, scaling, layer.softcap)[0].transpose(0, 1)


@pytest.mark.parametrize("backend_name", ["portable", "cpu"])
@pytest.mark.parametrize("block", [BLOCK, 5])  # the kernel's vector path (16-token blocks) and its plain loop
@pytest.mark.parametrize(
    "layer", [LayerAttention(), LayerAttention(window=40), LayerAttention(softcap=2.0), LayerAttention(7, 1.5)]
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_backend_equals_dense_attention(backend_name, block, layer, heads, kv_heads):
    torch.manual_seed(0)
    rng = random.Random(0)
    dim, num_blocks = 32, 400
    backend = PortableBackend(block) if backend_name == "portable" else CpuPagedBackend(block)
    raw = torch.zeros(2, num_blocks, block, kv_heads, dim)
    key_pool, value_pool = backend.pool_views(raw[0], raw[1])
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (new rows, context): decodes of different lengths, chunks over a prefix (one past 256 keys), fresh chunks
    shapes = [(1, 5), (1, 300), (1, 17), (1, 600), (40, 300), (3, 20), (35, 35), (1, 1)]
    sequences, dense, row = [], [], 0
    for rows, context in shapes:
        blocks = [free.pop() for _ in range(-(-context // block))]
        sequences.append(StepSequence(start=row, rows=rows, context=context, block_ids=blocks))
        k, v = torch.randn(kv_heads, context, dim), torch.randn(kv_heads, context, dim)
        slots = torch.tensor([b * block + i for b in blocks for i in range(block)][:context])
        sequence_meta = backend.prepare([StepSequence(0, context, context, blocks)], context, torch.device("cpu"))
        pool = KVPair(key_pool, value_pool)
        backend.write(pool, KVPair(k[None], v[None]), slots, sequence_meta)  # the backend's own layout
        dense.append((k, v))
        row += rows
    query = torch.randn(1, heads, row, dim)
    # this step's fresh K/V, as the model hands them over (already written into the pool)
    key = torch.cat([k[:, s.context - s.rows :] for (k, _), s in zip(dense, sequences, strict=True)], 1)[None]
    value = torch.cat([v[:, s.context - s.rows :] for (_, v), s in zip(dense, sequences, strict=True)], 1)[None]
    metadata = backend.prepare(sequences, row, torch.device("cpu"))
    out = backend.forward(LayerTensors(query, key, value, key_pool, value_pool), metadata, layer, 0.2)
    for seq, (k, v) in zip(sequences, dense, strict=True):
        expected = dense_reference(query, k, v, seq, layer, 0.2)
        torch.testing.assert_close(out[seq.start : seq.start + seq.rows], expected, atol=2e-5, rtol=1e-4)


def test_the_backend_choice_falls_back_to_portable(monkeypatch):
    import serving.engine.cpu_attention as cpu_attention
    from serving.engine.attention_backend import select_backend

    monkeypatch.delenv("SESSIONSERVE_ATTENTION", raising=False)
    cpu = torch.device("cpu")
    assert select_backend(BLOCK, cpu, torch.float32).name == "cpu"
    assert select_backend(BLOCK, cpu, torch.bfloat16).name == "portable"  # the kernel is fp32 only
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", "portable")
    assert select_backend(BLOCK, cpu, torch.float32).name == "portable"

    def no_compiler():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_attention, "load_kernel", no_compiler)
    monkeypatch.delenv("SESSIONSERVE_ATTENTION")
    assert select_backend(BLOCK, cpu, torch.float32).name == "portable"  # serves anyway, slower
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", "cpu")
    with pytest.raises(RuntimeError, match="no compiler"):
        select_backend(BLOCK, cpu, torch.float32)
