"""KVTC Triton kernels against the torch reference codec (lnarize_serve.kvtc).

On a CPU these run through Triton's interpreter on small shapes (the whole
module stays well under two minutes on 2 cores); on a GPU the same tests run
compiled. benchmarks/kvtc_kernels.py repeats the checks at GPU sizes.
"""

from __future__ import annotations

import pytest
import torch

from lnarize_serve.kvtc.format.attention import attention_on_slots, gather_slots
from lnarize_serve.kvtc.format.attention import write_slots as reference_write
from lnarize_serve.kvtc.format.codec import decode_kv, encode_kv
from tests.fixtures.kvtc_paged import POISON_BYTE, codec, paged_cache, slot_mapping, tokens

@pytest.mark.parametrize("layout", ["word-packed", "prefix"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_write_matches_reference_encoder_bytes(kernels, kernel_device, layout, block_size):
    gen = torch.Generator().manual_seed(block_size)
    layer, stats = codec(layout, 2, 64, seed=3)
    tables = kernels.prepare_layer_tables(layer.to(kernel_device))
    assert tables.keys.straddles == (layout == "prefix")
    k, v = tokens(stats, 45, "off-distribution", gen)
    num_blocks = 5
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:45]
    slots[::7] = -1  # vLLM padding: nothing may be written for these
    cache = torch.full((num_blocks, 2, block_size, layer.slot_bytes), POISON_BYTE,
                       dtype=torch.uint8, device=kernel_device)
    kernels.write_slots(k.to(kernel_device, torch.bfloat16), v.to(kernel_device, torch.bfloat16),
                        slots.to(kernel_device), cache, tables)
    expect = torch.full_like(cache, POISON_BYTE).cpu()
    keep = slots >= 0
    ref_slots = encode_kv(k[keep].bfloat16().float(), v[keep].bfloat16().float(), layer)
    reference_write(expect, ref_slots, slots[keep])
    assert torch.equal(cache.cpu(), expect)


def _reference_lse(query, cache, table, seq_lens, qsl, layer, scale):
    """Natural-log LSE of the scores of decoded (lossy) keys, causal."""
    num_kv, group = layer.num_kv_heads, query.shape[1] // layer.num_kv_heads
    rows = []
    for b in range(seq_lens.shape[0]):
        start, end, n = int(qsl[b]), int(qsl[b + 1]), int(seq_lens[b])
        keys, _ = decode_kv(gather_slots(cache, table[b], n), layer)
        q = query[start:end].float().view(end - start, num_kv, group, -1)
        scores = torch.einsum("nhgd,lhd->nhgl", q, keys) * scale
        visible = torch.arange(n)[None, :] <= (n - (end - start) + torch.arange(end - start))[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        rows.append(torch.logsumexp(scores, dim=-1).reshape(end - start, -1))
    return torch.cat(rows)


CASES = {
    # name: (layout, kv heads, group, head_dim, seq_lens, query tokens, block size, splits, data);
    # word-packed layouts take the unit-fp16 code decoding, prefix (straddling) the original one
    "ragged-mtp-bs16": ("word-packed", 2, 3, 64, [37, 5, 130], [1, 4, 3], 16, None, "calibrated"),
    "ragged-one-split-bs32": ("word-packed", 2, 3, 64, [70, 1], [2, 1], 32, 1, "off-distribution"),
    "many-splits-bs8": ("word-packed", 2, 2, 64, [90, 33], [4, 4], 8, 7, "calibrated"),
    "straddling-offsets": ("prefix", 2, 3, 64, [30, 9], [1, 4], 16, 2, "calibrated"),
    "qwen-group-d256": ("word-packed", 1, 6, 256, [40], [2], 16, 2, "calibrated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_reference_attention(kernels, kernel_device, case):
    layout, num_kv, group, dim, seq_lens, nqs, block_size, splits, data = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    layer, stats = codec(layout, num_kv, dim, seed=7)
    dev_layer = layer.to(kernel_device)
    tables = kernels.prepare_layer_tables(dev_layer)
    # the layout picks the code decoding: unit-fp16, or the original where codes straddle words
    assert tables.keys.straddles == tables.values.straddles == (layout == "prefix")
    table, cache = paged_cache(layer, seq_lens, block_size, gen, kernel_device)
    for b, n in enumerate(seq_lens):
        k, v = tokens(stats, n, data, gen)
        kernels.write_slots(k.to(kernel_device), v.to(kernel_device),
                            slot_mapping(table, b, n, block_size), cache, tables)
    qsl = torch.tensor([0, *torch.tensor(nqs).cumsum(0).tolist()], dtype=torch.int32)
    query = (torch.randn(int(qsl[-1]), num_kv * group, dim, generator=gen) * 2.0).to(torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = dim ** -0.5
    out = torch.full(query.shape, float("nan"), dtype=torch.float32, device=kernel_device)
    out, lse = kernels.decode_attention(
        query.to(kernel_device), cache, table, lens.to(kernel_device), qsl.to(kernel_device),
        tables, scale, max(nqs), max(seq_lens), num_splits=splits, out=out, return_lse=True,
        block_t=16)
    cache, table = cache.cpu(), table.cpu()
    ref = attention_on_slots(query.float(), cache, table, lens, qsl, layer, scale)
    assert torch.isfinite(out).all(), "unwritten (poisoned) outputs"
    err = float((out.cpu() - ref).norm() / ref.norm())
    assert err < 5e-3, err
    ref_lse = _reference_lse(query, cache, table, lens, qsl, layer, scale)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=2e-3, atol=2e-3)


def test_decode_reads_slots_written_by_the_reference_encoder(kernels, kernel_device):
    """Write and decode are each checked against the reference, not each other."""
    gen = torch.Generator().manual_seed(11)
    layer, stats = codec("word-packed", 2, 64, seed=5)
    tables = kernels.prepare_layer_tables(layer.to(kernel_device))
    seq_lens, block_size = [23, 61], 16
    table, cache = paged_cache(layer, seq_lens, block_size, gen, "cpu")
    for b, n in enumerate(seq_lens):
        k, v = tokens(stats, n, "calibrated", gen)
        reference_write(cache, encode_kv(k, v, layer), slot_mapping(table, b, n, block_size))
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    query = torch.randn(2, 6, 64, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = kernels.decode_attention(query.to(kernel_device), cache.to(kernel_device),
                                   table.to(kernel_device), lens.to(kernel_device),
                                   qsl.to(kernel_device), tables, 0.125, 1, 64, block_t=16)
    ref = attention_on_slots(query, cache, table, lens, qsl, layer, 0.125)
    assert float((out.cpu() - ref).norm() / ref.norm()) < 5e-3


def test_bad_inputs_are_refused_with_the_reason(kernels, kernel_device):
    layer, _ = codec("word-packed", 2, 64, seed=1)
    tables = kernels.prepare_layer_tables(layer.to(kernel_device))
    k = torch.zeros(3, 2, 64, device=kernel_device)
    wrong_cache = torch.zeros(2, 2, 16, layer.slot_bytes + 4, dtype=torch.uint8, device=kernel_device)
    with pytest.raises(ValueError, match="cache must be uint8"):
        kernels.write_slots(k, k, torch.zeros(3, dtype=torch.int64, device=kernel_device),
                            wrong_cache, tables)
    with pytest.raises(ValueError, match="query heads are not a multiple"):
        kernels.decode_attention(torch.zeros(1, 3, 64, device=kernel_device), wrong_cache, None,
                                 None, None, tables, 1.0, 1, 16)


def test_decode_over_a_range_of_positions_matches_the_reference(kernels, kernel_device):
    """compressed_range: sequence 0 skips its sink position and its 4 verify
    rows each stop where their own 8-token window begins (not before the
    12-position exact suffix), 1 reads all, 2 (one token, its sink) reads
    nothing: LSE -inf and a finite output, which the glue's merge weighs 0."""
    gen = torch.Generator().manual_seed(21)
    layer, stats = codec("word-packed", 2, 64, seed=9)
    tables = kernels.prepare_layer_tables(layer.to(kernel_device))
    seq_lens, block_size = [45, 20, 1], 16  # query tokens 4, 1, 1
    table, cache = paged_cache(layer, seq_lens, block_size, gen, kernel_device)
    for b, n in enumerate(seq_lens):
        k, v = tokens(stats, n, "calibrated", gen)
        kernels.write_slots(k.to(kernel_device), v.to(kernel_device),
                            slot_mapping(table, b, n, block_size), cache, tables)
    qsl = torch.tensor([0, 4, 5, 6], dtype=torch.int32)
    query = torch.randn(6, 6, 64, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    lo = torch.tensor([1, 0, 1], dtype=torch.int32)
    hi = lens - torch.tensor([12, 0, 0], dtype=torch.int32)
    out, lse = kernels.decode_attention(
        query.to(kernel_device), cache, table, lens.to(kernel_device), qsl.to(kernel_device),
        tables, 0.125, 4, 45, num_splits=3, return_lse=True, block_t=16,
        compressed_range=(lo.to(kernel_device), hi.to(kernel_device), 8))
    ref, ref_lse = attention_on_slots(query, cache.cpu(), table.cpu(), lens, qsl, layer, 0.125,
                                      compressed_range=(lo, hi, 8), return_lse=True)
    assert torch.isfinite(out[5]).all()
    assert torch.isneginf(lse[5]).all() and torch.isneginf(ref_lse[5]).all()
    err = float((out[:5].cpu() - ref[:5]).norm() / ref[:5].norm())
    assert err < 5e-3, err
    torch.testing.assert_close(lse[:5].cpu(), ref_lse[:5], rtol=2e-3, atol=2e-3)
