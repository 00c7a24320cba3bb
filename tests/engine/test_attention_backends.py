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
from serving.engine.flex_attention import FlexPagedBackend

BLOCK = 16


def dense_reference(query, keys, values, seq: StepSequence, layer: LayerAttention, scaling: float) -> torch.Tensor:
    """[rows, heads, dim] from the sequence's own dense K/V ([kv_heads, context, dim])."""
    q = query[:, :, seq.start : seq.start + seq.rows]
    mask = causal_mask(seq.rows, seq.context, layer.window, torch.device("cpu"))
    return attend(q, keys[None], values[None], mask, scaling, layer.softcap)[0].transpose(0, 1)


MIXED = [(1, 5), (1, 300), (1, 17), (1, 600), (40, 300), (3, 20), (35, 35), (1, 1)]


@pytest.fixture
def two_threads():
    """The kernel picks its work items by the thread count: pin it so that both kinds are exercised anywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("block", [BLOCK, 5])  # the kernel's vector path (16-token blocks) and its plain loop
@pytest.mark.parametrize(
    "layer", [LayerAttention(), LayerAttention(window=40), LayerAttention(softcap=2.0), LayerAttention(7, 1.5)]
)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
# (new rows, context): decodes of different lengths, chunks over a prefix (one past 256 keys), fresh chunks, for
# every backend; with 2 threads that is enough query tiles for the CPU kernel's whole-block work items (every kv
# head), and one decode alone takes its one-kv-head items, a split only that kernel makes
@pytest.mark.parametrize(
    ("backend_name", "shapes"),
    [
        ("portable", MIXED),
        ("cpu", MIXED),
        pytest.param("flex", MIXED, marks=pytest.mark.slow),  # eager flex: ~1 s a case on a CPU
        ("cpu", [(1, 300)]),
    ],
)
def test_backend_equals_dense_attention(backend_name, block, layer, heads, kv_heads, shapes, two_threads):
    check_backend_against_dense(backend_name, block, layer, heads, kv_heads, shapes, torch.float32)


# bfloat16 storage: the kernel widens K/V and queries as it loads them and computes in fp32, so it matches fp32
# attention over the same (bf16-rounded) values up to the rounding of its bf16 output
@pytest.mark.parametrize("block", [BLOCK, 5])
@pytest.mark.parametrize("layer", [LayerAttention(), LayerAttention(window=40), LayerAttention(softcap=2.0)])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
@pytest.mark.parametrize("shapes", [MIXED, [(1, 300)]])
def test_the_cpu_kernel_in_bfloat16_equals_fp32_attention_over_the_same_values(
    block, layer, heads, kv_heads, shapes, two_threads
):
    check_backend_against_dense("cpu", block, layer, heads, kv_heads, shapes, torch.bfloat16)


def check_backend_against_dense(backend_name, block, layer, heads, kv_heads, shapes, dtype):
    """One step of `shapes` (new rows, context) through the backend, each sequence's rows against dense fp32
    attention over the values the pool holds."""
    torch.manual_seed(0)
    rng = random.Random(0)
    dim, num_blocks = 32, 400
    backends = {
        "portable": lambda: PortableBackend(block),
        "cpu": lambda: CpuPagedBackend(block),
        "flex": lambda: FlexPagedBackend(block, num_blocks, compiled=False),  # eager: mask_mod (CUDA: compiled)
        "flex-compiled": lambda: FlexPagedBackend(block, num_blocks, compiled=True, dynamic=False),
    }
    backend = backends[backend_name]()
    raw = torch.zeros(2, num_blocks, block, kv_heads, dim, dtype=dtype)
    key_pool, value_pool = backend.pool_views(raw[0], raw[1])
    free = list(range(num_blocks))
    rng.shuffle(free)
    sequences, dense, row = [], [], 0
    for rows, context in shapes:
        blocks = [free.pop() for _ in range(-(-context // block))]
        sequences.append(StepSequence(start=row, rows=rows, context=context, block_ids=blocks))
        k, v = torch.randn(kv_heads, context, dim, dtype=dtype), torch.randn(kv_heads, context, dim, dtype=dtype)
        slots = torch.tensor([b * block + i for b in blocks for i in range(block)][:context])
        sequence_meta = backend.prepare([StepSequence(0, context, context, blocks)], context, torch.device("cpu"))
        pool = KVPair(key_pool, value_pool)
        backend.write(pool, KVPair(k[None], v[None]), slots, sequence_meta)  # the backend's own layout
        dense.append((k, v))
        row += rows
    query = torch.randn(1, heads, row, dim, dtype=dtype)
    # this step's fresh K/V, as the model hands them over (already written into the pool)
    key = torch.cat([k[:, s.context - s.rows :] for (k, _), s in zip(dense, sequences, strict=True)], 1)[None]
    value = torch.cat([v[:, s.context - s.rows :] for (_, v), s in zip(dense, sequences, strict=True)], 1)[None]
    metadata = backend.prepare(sequences, row, torch.device("cpu"))
    out = backend.forward(LayerTensors(query, key, value, key_pool, value_pool), metadata, layer, 0.2)
    assert out.dtype == dtype
    for seq, (k, v) in zip(sequences, dense, strict=True):
        expected = dense_reference(query.float(), k.float(), v.float(), seq, layer, 0.2)
        got = out[seq.start : seq.start + seq.rows].float()
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        elif seq.fresh and seq.rows > 1 and layer.softcap is None:  # torch's SDPA, which rounds as it goes in bf16
            torch.testing.assert_close(got, expected, atol=1e-2, rtol=1.6e-2)
        else:  # the kernel: no further from it than rounding to bf16 goes (half a unit in the last of its 8 bits)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=2**-8)


def test_the_backend_choice_falls_back_to_portable(monkeypatch):
    import serving.engine.cpu_attention as cpu_attention
    from serving.engine.attention_backend import select_backend

    monkeypatch.delenv("SESSIONSERVE_ATTENTION", raising=False)
    cpu = torch.device("cpu")
    assert select_backend(BLOCK, 64, cpu, torch.float32).name == "cpu"
    assert select_backend(BLOCK, 64, cpu, torch.bfloat16).name == "cpu"
    assert select_backend(BLOCK, 64, cpu, torch.float16).name == "portable"  # the kernel stores fp32 or bf16
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", "portable")
    assert select_backend(BLOCK, 64, cpu, torch.float32).name == "portable"

    def no_compiler():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(cpu_attention, "load_kernel", no_compiler)
    monkeypatch.delenv("SESSIONSERVE_ATTENTION")
    assert select_backend(BLOCK, 64, cpu, torch.float32).name == "portable"  # serves anyway, slower
    monkeypatch.setenv("SESSIONSERVE_ATTENTION", "cpu")
    with pytest.raises(RuntimeError, match="no compiler"):
        select_backend(BLOCK, 64, cpu, torch.float32)


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "dtype", "block_size", "installed", "chosen", "passed_over"),
    [
        (CUDA, torch.bfloat16, 256, {"flash_attn"}, "flash_attn", []),
        (CUDA, torch.bfloat16, 16, {"flash_attn"}, "flex", ["multiple of 256, not 16"]),
        (CUDA, torch.float32, 256, {"flash_attn"}, "flex", ["float16/bfloat16, not torch.float32"]),
        (CUDA, torch.bfloat16, 256, set(), "flex", ["flash-attn is not installed"]),
        (CUDA, torch.bfloat16, 8, set(), "portable", ["not installed", "multiple of 16, not 8"]),
        (CPU, torch.float32, 16, {"flash_attn"}, "cpu", ["runs on CUDA", "fused on CUDA only"]),
        (CPU, torch.bfloat16, 16, set(), "cpu", ["runs on CUDA", "fused on CUDA only"]),
        (CPU, torch.float16, 16, set(), "portable", ["runs on CUDA", "fused on CUDA only", "and bfloat16 on the CPU"]),
    ],
)
def test_choose_backend_by_device_dtype_block_size_and_packages(
    device, dtype, block_size, installed, chosen, passed_over
):
    from serving.engine.attention_backend import choose_backend

    name, reasons = choose_backend(device, dtype, block_size, installed)
    assert name == chosen
    assert len(reasons) == len(passed_over)
    for reason, expected in zip(reasons, passed_over, strict=True):
        assert expected in reason, (reason, expected)


def test_a_forced_backend_that_cannot_serve_says_why():
    from serving.engine.attention_backend import choose_backend

    with pytest.raises(ValueError, match="multiple of 256, not 16"):
        choose_backend(CUDA, torch.bfloat16, 16, {"flash_attn"}, "flash_attn")
    with pytest.raises(ValueError, match="flash-attn runs on CUDA"):
        choose_backend(CPU, torch.float32, 256, {"flash_attn"}, "flash_attn")
    with pytest.raises(ValueError, match="expected one of auto, portable"):
        choose_backend(CPU, torch.float32, 16, set(), "flashinfer")
    assert choose_backend(CPU, torch.float32, 4, set(), "flex") == ("flex", [])  # eager, for tests


@pytest.mark.parametrize(
    ("layer", "window_size", "softcap"),
    [
        (LayerAttention(), (-1, -1), 0.0),
        (LayerAttention(window=40), (39, 0), 0.0),
        (LayerAttention(7, 1.5), (6, 0), 1.5),
    ],
)
def test_flash_attn_arguments_translate_window_and_softcap(layer, window_size, softcap):
    """flash-attn's window (left, right) excludes the query's own key; ours includes it."""
    from serving.engine.flash_attention import kernel_arguments

    assert kernel_arguments(layer, 0.125) == {
        "softmax_scale": 0.125, "causal": True, "window_size": window_size, "softcap": softcap,
    }  # fmt: skip


def test_flex_block_lists_cover_every_attended_block_and_full_ones_are_whole():
    """The sparse block lists (what the fused kernels read; eager flex applies only the mask_mod) against the
    mask_mod evaluated densely: every attended pool block is listed, and a block listed as full is attended by
    every row of the query tile (the kernel skips the mask there)."""
    from torch.nn.attention.flex_attention import create_mask

    num_blocks = 40
    backend = FlexPagedBackend(BLOCK, num_blocks, compiled=False)
    sequences = [
        StepSequence(0, 1, 37, [5, 2, 30]),
        StepSequence(1, 1, 16, [7]),
        StepSequence(2, 200, 250, [11, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]),
    ]
    metadata = backend.prepare(sequences, 202, CPU)
    for group in metadata.groups:
        for window in (None, 20):
            counts, indices, full_counts, full_indices = backend.block_lists(group, window)
            block_mask = backend._block_mask(group, window)
            dense = create_mask(block_mask.mask_mod, len(group.starts), 1, group.rows, num_blocks * BLOCK, "cpu")
            for b in range(len(group.starts)):
                for tile in range(counts.shape[-1]):
                    rows = dense[b, 0, tile * 128 : (tile + 1) * 128].view(-1, num_blocks, BLOCK)
                    attended = set(torch.nonzero(rows.any(0).any(-1)).flatten().tolist())
                    partial = set(indices[b, 0, tile, : counts[b, 0, tile]].tolist())
                    full = set(full_indices[b, 0, tile, : full_counts[b, 0, tile]].tolist())
                    assert attended and not partial & full
                    assert attended <= partial | full, (b, tile, window, attended - partial - full)
                    whole = set(torch.nonzero(rows.all(0).all(-1)).flatten().tolist())
                    assert full <= whole, (b, tile, window, full - whole)
                    if window is None and group.rows == 1:
                        assert full, "a decode past its first block reads whole blocks unmasked"


@pytest.mark.slow  # inductor compiles a C++ kernel per mask: ~50 s for both on a cold cache
@pytest.mark.parametrize("layer", [LayerAttention(window=40), LayerAttention(softcap=2.0)])
def test_compiled_flex_on_the_cpu_equals_dense_attention(layer):
    """The fused kernel reads only the listed blocks, so this checks the block lists end to end (torch's CPU
    template: static shapes; CUDA compiles the same call for dynamic shapes, not run here)."""
    test_backend_equals_dense_attention("flex-compiled", BLOCK, layer, 9, 3, MIXED, None)
