"""Pure-logic parts of the KVTC vLLM integration (no engine)."""

import types

import pytest
import torch

from lnarize_serve.kvtc.attention import attention_on_slots, write_slots
from lnarize_serve.kvtc.codec import encode_kv
from lnarize_serve.kvtc.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.kvtc_ops import TorchReferenceOps, kvtc_attention
from lnarize_serve.kvtc.model_codecs import (
    CalibrationMismatch,
    ModelCodecs,
    check_against_model,
    full_attention_layer_indices,
    layer_ordinal,
    load_model_codecs,
    save_model_codecs,
)
from lnarize_serve.kvtc.runtime_config import (
    KVTCConfigError,
    KVTCRuntimeConfig,
    runtime_config_from_environ,
)


def _codecs(num_layers=2, heads=2, head_dim=64):
    return ModelCodecs(tuple(random_layer_codec(heads, head_dim, seed=i)[0] for i in range(num_layers)))


def test_model_codecs_roundtrip_through_safetensors(tmp_path):
    codecs = _codecs()
    path = tmp_path / "c.safetensors"
    save_model_codecs(codecs, path)
    loaded = load_model_codecs(path)
    assert loaded.slot_bytes == codecs.slot_bytes == 48
    for a, b in zip(codecs.layers, loaded.layers):
        assert torch.equal(a.keys.basis, b.keys.basis)
        assert torch.equal(a.values.bits, b.values.bits)
        assert a.values.num_bytes == b.values.num_bytes


def test_a_file_of_another_kind_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(CalibrationMismatch, match="not a"):
        load_model_codecs(path)


def test_mismatched_calibration_names_every_difference():
    with pytest.raises(CalibrationMismatch) as info:
        check_against_model(_codecs(2, 2, 64), num_full_attention_layers=30, num_kv_heads=3, head_dim=64)
    assert "2 calibrated layers" in str(info.value) and "2 KV heads" in str(info.value)


def test_layer_names_map_to_full_attention_ordinals():
    hybrid = types.SimpleNamespace(num_hidden_layers=8, layer_types=None, full_attention_interval=4)
    full = full_attention_layer_indices(hybrid)
    assert full == [3, 7]
    assert layer_ordinal("model.layers.3.self_attn.attn", full) == 0
    assert layer_ordinal("model.layers.7.self_attn.attn", full) == 1
    # the MTP draft layer reuses the last target layer's calibration
    assert layer_ordinal("model.layers.8.self_attn.attn", full) == 1
    assert layer_ordinal("mtp.layers.0.self_attn.attn", full) == 1
    with pytest.raises(CalibrationMismatch):
        layer_ordinal("model.layers.2.self_attn.attn", full)


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
