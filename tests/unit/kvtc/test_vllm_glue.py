"""Pure-logic parts of the KVTC vLLM integration (no engine)."""

import pytest
import torch

from lnarize_serve.kvtc.attention import attention_on_slots, write_slots
from lnarize_serve.kvtc.codec import encode_kv
from lnarize_serve.kvtc.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.kvtc_ops import TorchReferenceOps, kvtc_attention
from lnarize_serve.kvtc.calibration import CalibrationError
from lnarize_serve.kvtc.model_codecs import layer_index_for
from lnarize_serve.kvtc.runtime_config import (
    KVTCConfigError,
    KVTCRuntimeConfig,
    runtime_config_from_environ,
)


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


def test_gpu_prefill_over_decoded_history_equals_the_reference():
    """The CUDA prefill path (decode history, SDPA in query blocks) computes
    what the reference prefill computes; runnable on CPU tensors."""
    from lnarize_serve.kvtc.kvtc_ops import prefill_over_decoded_history

    codec, stats = random_layer_codec(2, 64, seed=5)
    gen = torch.Generator().manual_seed(1)
    block_size, lens, query_lens = 16, [50, 37], [30, 37]
    cache = torch.zeros(10, 2, block_size, codec.slot_bytes, dtype=torch.uint8)
    block_table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    keys = [sample_from_statistics(stats["keys"], n, gen) for n in lens]
    values = [sample_from_statistics(stats["values"], n, gen) for n in lens]
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        slots = block_table[b][pos // block_size].long() * block_size + pos % block_size
        write_slots(cache, encode_kv(keys[b], values[b], codec), slots)
    query = torch.randn(sum(query_lens), 6, 64, generator=gen)
    qsl = torch.tensor([0, 30, 67])
    chunk_k = torch.cat([k[-q:] for k, q in zip(keys, query_lens)])
    chunk_v = torch.cat([v[-q:] for v, q in zip(values, query_lens)])
    args = (query, cache, block_table, torch.tensor(lens), qsl, codec, 0.125, chunk_k, chunk_v)
    reference = TorchReferenceOps().prefill(*args)
    torch.testing.assert_close(prefill_over_decoded_history(*args, query_block=8), reference,
                               rtol=1e-4, atol=1e-4)
