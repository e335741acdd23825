"""The calibration load path names its devices: vLLM's GPU workers run with
cuda as torch's default device, so a factory without a device would put its
tensor there and meet CPU tensors in the next op. Here the default device is
"meta" (no data, no kernels): any factory that relies on the default makes
that op fail or leaves a meta tensor behind."""

from contextlib import contextmanager

import pytest
import torch

from lnarize_serve.kvtc.format.calibration import Calibration, RotaryInfo, load_calibration
from lnarize_serve.kvtc.format.codec import decode_kv, encode_kv
from lnarize_serve.kvtc.format.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.serving.kvtc_ops import ExactTokens, TorchReferenceOps, kvtc_attention, kvtc_write
from lnarize_serve.kvtc.serving.model_codecs import load_serving_calibration
from lnarize_serve.kvtc.serving.sink import SinkConstants

CPU = torch.device("cpu")


@pytest.fixture
def calibration_file(tmp_path):
    codec, stats = random_layer_codec(2, 64, seed=21)
    gen = torch.Generator().manual_seed(3)
    sink_k = sample_from_statistics(stats["keys"], 1, gen)[0] * 3.0
    sink_v = sample_from_statistics(stats["values"], 1, gen)[0]
    calibration = Calibration("t", 64, 2, 4, {3: codec}, RotaryInfo(16, 1e7), sink_tokens=1,
                              sink_keys={3: sink_k}, sink_values={3: sink_v}, sink_token_id=0)
    return calibration.save(tmp_path / "c.safetensors"), stats


@contextmanager
def meta_default_device():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _all_tensors(calibration: Calibration):
    for codec in calibration.layers.values():
        for part in (codec.keys, codec.values):
            yield from (part.mean, part.basis, part.bits, part.scale, part.zero, part.bit_offset)
    yield from calibration.sink_keys.values()
    yield from calibration.sink_values.values()


def test_serving_load_ignores_the_default_device(calibration_file):
    path, _ = calibration_file
    load_serving_calibration.cache_clear()
    try:
        with meta_default_device():
            calibration = load_serving_calibration(str(path))
    finally:
        load_serving_calibration.cache_clear()
    assert {t.device for t in _all_tensors(calibration)} == {CPU}


def test_codec_round_trip_and_kernel_tables_ignore_the_default_device(calibration_file):
    from lnarize_serve.kvtc.kernels import prepare_layer_tables

    path, stats = calibration_file
    gen = torch.Generator().manual_seed(5)
    keys = sample_from_statistics(stats["keys"], 7, gen)
    values = sample_from_statistics(stats["values"], 7, gen)
    with meta_default_device():
        codec = load_calibration(path).layers[3]
        slots = encode_kv(keys, values, codec)
        k_hat, v_hat = decode_kv(slots, codec)
        tables = prepare_layer_tables(codec)
    assert slots.device == k_hat.device == v_hat.device == CPU
    torch.testing.assert_close(decode_kv(slots, codec), (k_hat, v_hat))
    for part in (tables.keys, tables.values):
        devices = {v.device for v in vars(part).values() if isinstance(v, torch.Tensor)}
        assert devices == {CPU}


def test_glue_with_sink_merge_ignores_the_default_device(calibration_file):
    """Writes, then decode and verify rows with the exact sink: the merge
    builds its row-to-sequence tables on the CPU from the CPU query lengths;
    the result equals the same call with the CPU as default device."""
    path, stats = calibration_file
    calibration = load_calibration(path)
    codec = calibration.layers[3]
    gen = torch.Generator().manual_seed(9)
    lens, query_lens, block_size = [20, 9], [4, 1], 16
    block_table = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    tokens = [(sample_from_statistics(stats["keys"], n, gen),
               sample_from_statistics(stats["values"], n, gen)) for n in lens]
    query = torch.randn(sum(query_lens), 4, 64, generator=gen)
    qsl = torch.tensor([0, 4, 5])

    def run():
        ops = TorchReferenceOps()
        sink = SinkConstants.for_layer(calibration, 3,
                                       lambda k, v, c, s: ops.write(k, v, c, s, codec),
                                       torch.float32, CPU)
        cache = torch.zeros(4, 2, block_size, codec.slot_bytes, dtype=torch.uint8, device=CPU)
        for b, (k, v) in enumerate(tokens):
            k, v = k.clone(), v.clone()
            k[0], v[0] = sink.keys, sink.values
            pos = torch.arange(lens[b], device=CPU)
            slots = block_table[b][pos // block_size].long() * block_size + pos % block_size
            kvtc_write(ops, k, v, cache, slots, codec, ExactTokens(sink=sink))
        return kvtc_attention(ops, query, cache, block_table, torch.tensor(lens, device=CPU),
                              qsl, qsl, codec, 0.125, None, None, max_seq_len=20,
                              exact=ExactTokens(sink=sink))

    expected = run()
    with meta_default_device():
        out = run()
    assert out.device == CPU
    torch.testing.assert_close(out, expected)
