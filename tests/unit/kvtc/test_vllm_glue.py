"""Pure-logic parts of the KVTC vLLM integration (no engine)."""

import pytest
import torch

from lnarize_serve.kvtc.attention import attention_on_slots, write_slots
from lnarize_serve.kvtc.calibration import CalibrationError
from lnarize_serve.kvtc.codec import encode_kv
from lnarize_serve.kvtc.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.kvtc_ops import (
    TorchReferenceOps,
    kvtc_attention,
    kvtc_write,
    prefill_over_decoded_history,
)
from lnarize_serve.kvtc.model_codecs import layer_index_for
from lnarize_serve.kvtc.runtime_config import (
    KVTCConfigError,
    KVTCRuntimeConfig,
    runtime_config_from_environ,
)
from lnarize_serve.kvtc.sink import SinkConstants, sink_flags, snap_to_sink


def test_layer_names_map_to_calibrated_layers():
    full = [3, 7]
    assert layer_index_for("model.layers.3.self_attn.attn", full, 8) == 3
    assert layer_index_for("model.layers.7.self_attn.attn", full, 8) == 7
    # the MTP draft layer reuses the last target layer's calibration
    assert layer_index_for("model.layers.8.self_attn.attn", full, 8) == 7
    assert layer_index_for("mtp.layers.0.self_attn.attn", full, 8) == 7
    with pytest.raises(CalibrationError, match="no KVTC calibration"):
        layer_index_for("model.layers.2.self_attn.attn", full, 8)


def test_runtime_config_round_trips_through_the_environment(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"x")
    environ: dict[str, str] = {}
    assert runtime_config_from_environ(environ) is None
    KVTCRuntimeConfig(str(path), 0, 0).export(environ)
    assert runtime_config_from_environ(environ) == KVTCRuntimeConfig(str(path), 0, 0)
    environ["LNARIZE_KVTC_CALIBRATION"] = str(tmp_path / "missing")
    with pytest.raises(KVTCConfigError, match="LNARIZE_KVTC_CALIBRATION"):
        runtime_config_from_environ(environ)
    with pytest.raises(KVTCConfigError, match="not a boolean"):
        runtime_config_from_environ({"LNARIZE_KVTC_ENABLE": "maybe"})


def test_glue_splits_decode_and_prefill_rows_like_separate_calls():
    """A mixed batch (a 3-token verify row, then a 40-token prefill chunk over
    history) gives what the reference op gives for each row on its own."""
    codec, stats = random_layer_codec(2, 64, seed=3)
    gen = torch.Generator().manual_seed(0)
    block_size, lens = 16, [21, 70]
    query_lens = [3, 40]
    cache = torch.zeros(12, 2, block_size, codec.slot_bytes, dtype=torch.uint8)
    block_table = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], dtype=torch.int32)
    keys = [sample_from_statistics(stats["keys"], n, gen) for n in lens]
    values = [sample_from_statistics(stats["values"], n, gen) for n in lens]
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = block_table[b][pos // block_size].long() * block_size + pos % block_size
        write_slots(cache, encode_kv(keys[b], values[b], codec), slots)
    query = torch.randn(sum(query_lens), 4, 64, generator=gen)
    qsl = torch.tensor([0, 3, 43])
    seq_lens = torch.tensor(lens)
    chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
    chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
    out = kvtc_attention(TorchReferenceOps(), query, cache, block_table, seq_lens, qsl, qsl,
                         codec, 0.125, chunk_k, chunk_v, max_seq_len=70)
    decode = attention_on_slots(query[:3], cache, block_table[:1], seq_lens[:1], qsl[:2], codec, 0.125)
    prefill = attention_on_slots(query[3:], cache, block_table[1:], seq_lens[1:], qsl[1:] - 3, codec,
                                 0.125, exact_keys=chunk_k[3:], exact_values=chunk_v[3:])
    torch.testing.assert_close(out[:3], decode)
    torch.testing.assert_close(out[3:], prefill)


def _paged(codec, stats, lens, block_size, gen, first_tokens=None):
    """A paged cache holding sequences of ``lens`` tokens (sampled K/V); the
    first token of sequence b is ``first_tokens[b]`` (K, V) when given."""
    blocks = [-(-n // block_size) for n in lens]
    cache = torch.zeros(sum(blocks) + 1, codec.num_kv_heads, block_size, codec.slot_bytes,
                        dtype=torch.uint8)
    block_table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 1  # block 0 stays unused: a zero block table row must not look like data
    keys, values = [], []
    for b, n in enumerate(lens):
        block_table[b, :blocks[b]] = torch.arange(used, used + blocks[b])
        used += blocks[b]
        k = sample_from_statistics(stats["keys"], n, gen)
        v = sample_from_statistics(stats["values"], n, gen)
        if first_tokens is not None and first_tokens[b] is not None:
            k[0], v[0] = first_tokens[b]
        keys.append(k)
        values.append(v)
    return cache, block_table, keys, values


def _write_all(ops, cache, block_table, keys, values, codec, sink, block_size):
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = torch.arange(k.shape[0])
        slots = block_table[b][pos // block_size].long() * block_size + pos % block_size
        kvtc_write(ops, k, v, cache, slots, codec, sink)


def _sink(codec, stats, gen):
    ops = TorchReferenceOps()
    k0 = sample_from_statistics(stats["keys"], 1, gen)[0] * 3.0  # sinks are large
    v0 = sample_from_statistics(stats["values"], 1, gen)[0]
    return SinkConstants.encoded(k0, v0, codec.slot_bytes,
                                 lambda k, v, c, s: ops.write(k, v, c, s, codec),
                                 torch.float32, torch.device("cpu"))


def test_prefill_over_decoded_history_equals_the_reference():
    """The prefill path (decode history, SDPA in query blocks) computes what
    the reference attention on slots computes, exact sink included."""
    codec, stats = random_layer_codec(2, 64, seed=5)
    gen = torch.Generator().manual_seed(1)
    block_size, lens, query_lens = 16, [50, 37], [30, 37]
    sink = _sink(codec, stats, gen)
    cache, block_table, keys, values = _paged(codec, stats, lens, block_size, gen,
                                              [(sink.keys, sink.values), None])
    _write_all(TorchReferenceOps(), cache, block_table, keys, values, codec, sink, block_size)
    query = torch.randn(sum(query_lens), 6, 64, generator=gen)
    qsl = torch.tensor([0, 30, 67])
    chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
    chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
    flags = sink_flags(cache, block_table, sink)
    assert flags.tolist() == [True, False]
    out = prefill_over_decoded_history(query, cache, block_table, torch.tensor(lens), qsl, codec,
                                       0.125, chunk_k, chunk_v, sink=sink, flags=flags,
                                       query_block=8)
    for b, sink_kv in enumerate([(sink.keys[None, None], sink.values[None, None]), (None, None)]):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        reference = attention_on_slots(query[rows], cache, block_table[b:b + 1],
                                       torch.tensor(lens[b:b + 1]), qsl[b:b + 2] - qsl[b], codec,
                                       0.125, exact_keys=chunk_k[rows], exact_values=chunk_v[rows],
                                       sink_keys=sink_kv[0], sink_values=sink_kv[1])
        torch.testing.assert_close(out[rows], reference, rtol=1e-4, atol=1e-4)


def test_writes_near_the_sink_store_its_pattern_and_others_do_not():
    codec, stats = random_layer_codec(2, 64, seed=2)
    gen = torch.Generator().manual_seed(4)
    sink = _sink(codec, stats, gen)
    near_k = sink.keys * (1 + 0.02 * torch.randn(sink.keys.shape, generator=gen))
    near_v = sink.values * (1 + 0.02 * torch.randn(sink.values.shape, generator=gen))
    far_k = sink.keys.clone()
    far_k[1] = -far_k[1]  # one head far off: not the sink
    key = torch.stack([near_k, far_k])
    value = torch.stack([near_v, sink.values])
    snapped_k, snapped_v = snap_to_sink(key, value, sink)
    assert torch.equal(snapped_k[0], sink.keys) and torch.equal(snapped_v[0], sink.values)
    assert torch.equal(snapped_k[1], far_k)
    cache = torch.zeros(2, 2, 16, codec.slot_bytes, dtype=torch.uint8)
    kvtc_write(TorchReferenceOps(), key, value, cache, torch.tensor([0, 16]), codec, sink)
    assert sink_flags(cache, torch.tensor([[0], [1]]), sink).tolist() == [True, False]


def test_decode_rows_attend_to_the_exact_sink_through_the_lse_merge():
    """Decode/verify rows: compressed positions 1.. from the decode op, the
    sink merged in exactly, equal to the reference with the sink substituted;
    a sequence whose first token is not the sink is read all compressed; a
    one-token sequence attends to the sink alone."""
    codec, stats = random_layer_codec(2, 64, seed=8)
    gen = torch.Generator().manual_seed(6)
    block_size, lens, query_lens = 16, [33, 21, 1], [4, 1, 1]
    sink = _sink(codec, stats, gen)
    cache, block_table, keys, values = _paged(
        codec, stats, lens, block_size, gen,
        [(sink.keys, sink.values), None, (sink.keys, sink.values)])
    _write_all(TorchReferenceOps(), cache, block_table, keys, values, codec, sink, block_size)
    query = torch.randn(sum(query_lens), 4, 64, generator=gen)
    qsl = torch.tensor([0, 4, 5, 6])
    out = kvtc_attention(TorchReferenceOps(), query, cache, block_table, torch.tensor(lens), qsl,
                         qsl, codec, 0.125, None, None, max_seq_len=33, sink=sink)
    for b, has_sink in enumerate([True, False, True]):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        sink_kv = (sink.keys[None, None], sink.values[None, None]) if has_sink else (None, None)
        reference = attention_on_slots(query[rows], cache, block_table[b:b + 1],
                                       torch.tensor(lens[b:b + 1]), qsl[b:b + 2] - qsl[b], codec,
                                       0.125, sink_keys=sink_kv[0], sink_values=sink_kv[1])
        torch.testing.assert_close(out[rows], reference, rtol=1e-4, atol=1e-5)
    # the sink-only row is exactly the sink's value (per query head of its group)
    torch.testing.assert_close(out[5], sink.values.repeat_interleave(2, dim=0))
