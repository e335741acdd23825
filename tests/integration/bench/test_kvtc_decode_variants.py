"""The experimental KVTC split kernels of benchmarks/kvtc_decode_variants.py:
each formulation against the torch reference attention, and the production
kernel (lnarize_serve) equal to the experimental variant 1 bit for bit, so
moving the experiments out of production changed no result.

On a CPU these run through Triton's interpreter (the production kernel's
funnel shift then runs as plain Triton, and the inline-PTX pair decode,
UNPACK 2, is skipped); on a GPU compiled.
"""

from __future__ import annotations

import pytest
import torch

from lnarize_serve.kvtc.format.attention import attention_on_slots
from tests.fixtures.kvtc_paged import codec, paged_cache, slot_mapping, tokens
from tests.fixtures.triton_kernels import kernel_device as _kernel_device
from tests.fixtures.triton_kernels import kernel_modules


@pytest.fixture(scope="module")
def kernel_device() -> str:
    return _kernel_device()


@pytest.fixture(scope="module")
def modules(kernel_device):
    """(production kernels, experimental variants), from one triton (both
    compiled or both interpreted)."""
    pytest.importorskip("triton", reason="the KVTC kernels are Triton kernels")
    with kernel_modules(kernel_device, "lnarize_serve.kvtc.kernels",
                        "benchmarks.kvtc_decode_variants") as found:
        yield tuple(found)


def _decode_inputs(kernels, layout, num_kv, group, dim, seq_lens, nqs, block_size, device, seed):
    """A paged cache written by the production write kernel, and queries."""
    gen = torch.Generator().manual_seed(seed)
    layer, stats = codec(layout, num_kv, dim, seed=seed)
    tables = kernels.prepare_layer_tables(layer.to(device))
    table, cache = paged_cache(layer, seq_lens, block_size, gen, device)
    for b, n in enumerate(seq_lens):
        k, v = tokens(stats, n, "calibrated", gen)
        kernels.write_slots(k.to(device), v.to(device), slot_mapping(table, b, n, block_size),
                            cache, tables)
    qsl = torch.tensor([0, *torch.tensor(nqs).cumsum(0).tolist()], dtype=torch.int32)
    query = (torch.randn(int(qsl[-1]), num_kv * group, dim, generator=gen) * 2.0).to(torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (query.to(device), cache, table, lens.to(device), qsl.to(device), tables, dim ** -0.5,
            max(nqs), max(seq_lens))
    return layer, args


# inline PTX cannot run in the interpreter, where UNPACK 2 would run the form of UNPACK 1
compiled_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX: GPU only")
FORMULATIONS = [  # (variant, tables_in_loop, unpack, layout); production's is compared below
    (0, False, 0, "word-packed"),
    (0, False, None, "prefix"),
    (1, False, 1, "word-packed"),  # tables pinned in registers
    (1, True, 0, "word-packed"),  # the original decode on word-packed codes
    pytest.param(1, True, 2, "word-packed", marks=compiled_only),  # unit-fp16 pairs in PTX
    (2, True, 1, "word-packed"),
    (2, False, None, "prefix"),
]


@pytest.mark.parametrize("variant,tables_in_loop,unpack,layout", FORMULATIONS)
def test_formulation_matches_reference_attention(modules, kernel_device, variant, tables_in_loop,
                                                 unpack, layout):
    kernels, variants = modules
    layer, args = _decode_inputs(kernels, layout, 2, 3, 64, [37, 5], [1, 4], 16, kernel_device,
                                 seed=variant + 1)
    out = variants.decode_attention(*args, num_splits=2, block_t=16, variant=variant,
                                    tables_in_loop=tables_in_loop, unpack=unpack)
    query, cache, table, lens, qsl, *_ = args
    ref = attention_on_slots(query.float().cpu(), cache.cpu(), table.cpu(), lens.cpu(), qsl.cpu(),
                             layer, 64 ** -0.5)
    assert torch.isfinite(out).all()
    err = float((out.float().cpu() - ref).norm() / ref.norm())
    assert err < 5e-3, err


def test_unit_decode_is_refused_where_codes_straddle_words(modules, kernel_device):
    kernels, variants = modules
    _, args = _decode_inputs(kernels, "prefix", 2, 3, 64, [9], [1], 16, kernel_device, seed=3)
    with pytest.raises(ValueError, match="no straddling codes"):
        variants.decode_attention(*args, unpack=1)
    with pytest.raises(ValueError, match="needs variant 1 or 2"):
        variants.decode_attention(*_decode_inputs(kernels, "word-packed", 2, 3, 64, [9], [1], 16,
                                                  kernel_device, seed=3)[1], variant=0, unpack=1)


SHAPES = {
    # name: (layout, kv heads, group, head_dim, seq_lens, query tokens, block size, splits, range)
    "ragged-mtp-with-range": ("word-packed", 2, 3, 64, [45, 20, 1], [4, 1, 1], 16, 3, True),
    "straddling-offsets": ("prefix", 2, 3, 64, [20, 9], [1, 4], 16, 2, False),
    "qwen-group-d256-one-split": ("word-packed", 1, 6, 256, [40], [2], 32, 1, False),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_production_kernel_equals_experimental_variant_1_bitwise(modules, kernel_device, shape):
    kernels, variants = modules
    layout, num_kv, group, dim, seq_lens, nqs, block_size, splits, ranged = SHAPES[shape]
    _, args = _decode_inputs(kernels, layout, num_kv, group, dim, seq_lens, nqs, block_size,
                             kernel_device, seed=len(shape))
    lens = args[3]
    compressed_range = None
    if ranged:  # sink skipped, each row stops at its own 8-token window
        compressed_range = (torch.ones_like(lens), torch.clamp(lens - 12, min=1), 8)
    common = dict(num_splits=splits, block_t=16, return_lse=True, compressed_range=compressed_range)
    out, lse = kernels.decode_attention(*args, **common)
    v_out, v_lse = variants.decode_attention(*args, variant=1, tables_in_loop=True, unpack=None,
                                             **common)
    assert torch.isfinite(out).all()
    assert torch.equal(out, v_out) and torch.equal(lse, v_lse)
    # the production choice hands out production's own function
    assert variants.decoder() is kernels.decode_attention
