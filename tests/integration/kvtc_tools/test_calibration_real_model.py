"""KVTC calibration end to end on the real SmolLM2-135M-Instruct (CPU): collect
post-RoPE K/V over the offline corpus, fit, write our format, read it back,
validate against the model, and check the codec's quality and the
compressed-domain attention on real keys, values and queries."""

from __future__ import annotations

import math

import pytest
import torch

from lnarize_serve.kvtc.format.attention import attention_on_slots, decoded_sequences, dense_attention
from lnarize_serve.kvtc.format.codec import encode_kv
from lnarize_serve.kvtc_tools.baselines import int_per_token_head_method, kvtc_method
from lnarize_serve.kvtc_tools.calibrate import FitOptions, fit_calibration, load_model
from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.calibration import CalibrationError, load_calibration, validate_against_model
from lnarize_serve.kvtc_tools.collect import KVCollector
from lnarize_serve.kvtc_tools.corpus import token_sequences
from lnarize_serve.kvtc_tools.evaluate import ExactTokens, evaluate_methods
from lnarize_serve.kvtc_tools.hf_hooks import attention_override


@pytest.fixture(scope="module")
def model_and_tokenizer():
    demo_model = pytest.importorskip("lnarize_serve.demo_model")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_model(demo_model.ensure_demo_model())
    except demo_model.DemoModelUnavailable as exc:  # pragma: no cover - env without the cpu extra
        pytest.skip(str(exc))
    yield model, tokenizer
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def calibration_file(model_and_tokenizer, tmp_path_factory):
    model, tokenizer = model_and_tokenizer
    options = FitOptions(key_bits_per_dim=2, value_bits_per_dim=4, num_sequences=4,
                         sequence_length=256, max_samples=512, batch_size=2,
                         # 1K tokens cannot sample 8K positions; the tests use < 300
                         rope_positions=512)
    calibration = fit_calibration(model, tokenizer, "SmolLM2-135M-Instruct", options)
    return calibration.save(tmp_path_factory.mktemp("kvtc") / "smollm2_k2v4.safetensors")


def test_file_round_trip_and_validation(model_and_tokenizer, calibration_file):
    model, tokenizer = model_and_tokenizer
    calibration = load_calibration(calibration_file)
    geometry = AttentionGeometry.from_config(model.config)
    validate_against_model(calibration, geometry)
    assert calibration.layer_indices == list(range(30))
    assert (calibration.key_bytes, calibration.value_bytes, calibration.slot_bytes) == (16, 32, 48)
    assert calibration.rotary.rotary_dim == 64
    for codec in calibration.layers.values():
        assert int(codec.keys.bits.sum(1).max()) <= 128
        assert int(codec.values.bits.sum(1).max()) <= 256
    # position 0 sees only itself: the recorded sink K/V are exact for any
    # sequence that starts with the calibrated token
    assert calibration.sink_tokens == 1 and calibration.sink_token_id == 1
    real = _real_layer_inputs(model, tokenizer, 7)
    torch.testing.assert_close(calibration.sink_keys[7], real["k"][0].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(calibration.sink_values[7], real["v"][0].float(), rtol=1e-4, atol=1e-4)
    wrong = AttentionGeometry(geometry.num_layers, geometry.full_attention_layers, 4,
                              geometry.num_q_heads, geometry.head_dim, 64, 1e4)
    with pytest.raises(CalibrationError, match="KV heads"):
        validate_against_model(calibration, wrong)


def _real_layer_inputs(model, tokenizer, layer_index):
    """Post-RoPE q, k, v of one layer on a held-out sequence."""
    captured = {}

    def grab(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer_index:
            captured.update(q=query[0].transpose(0, 1), k=key[0].transpose(0, 1),
                            v=value[0].transpose(0, 1), scale=kwargs.get("scaling"))
        from lnarize_serve.kvtc_tools.hf_hooks import sdpa
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    sequence = next(token_sequences(tokenizer, "eval", 200, 1))
    with attention_override(model, grab), torch.no_grad():
        model(input_ids=torch.tensor([sequence]), use_cache=False)
    return captured


def test_attention_on_slots_with_real_statistics(model_and_tokenizer, calibration_file):
    model, tokenizer = model_and_tokenizer
    layer_index = 12
    layer = load_calibration(calibration_file).layers[layer_index]
    real = _real_layer_inputs(model, tokenizer, layer_index)
    k, v, q = real["k"].float(), real["v"].float(), real["q"].float()  # [T, H, d]
    length, block = k.shape[0], 16
    num_blocks = math.ceil(length / block)
    cache = torch.zeros(num_blocks, layer.num_kv_heads, block, layer.slot_bytes, dtype=torch.uint8)
    table = torch.arange(num_blocks, dtype=torch.int32).flip(0)[None]
    positions = torch.arange(length)
    slots = table[0, positions // block].long() * block + positions % block
    cache.view(-1, layer.num_kv_heads, layer.slot_bytes)[slots] = encode_kv(k, v, layer)
    queries = q[-4:]  # MTP-style: 4 query tokens, causal among themselves
    qsl, lens = torch.tensor([0, 4]), torch.tensor([length])
    sinks = 4  # kept exact, as the layout decides
    got = attention_on_slots(queries, cache, table, lens, qsl, layer, real["scale"],
                             sink_keys=k[None, :sinks], sink_values=v[None, :sinks])
    dec_k, dec_v = decoded_sequences(cache, table, lens, layer)
    dec_k[0][:sinks], dec_v[0][:sinks] = k[:sinks], v[:sinks]
    torch.testing.assert_close(got, dense_attention(queries, dec_k, dec_v, qsl, real["scale"]),
                               rtol=1e-4, atol=1e-5)
    exact = dense_attention(queries, [k], [v], qsl, real["scale"])
    all_compressed = attention_on_slots(queries, cache, table, lens, qsl, layer, real["scale"])
    # K2V4 from this test's tiny calibration is far from exact on this layer
    # (docs/kvtc-eval.md has the real numbers; measured here 0.97 vs 1.15):
    # the exact sink must still lower the error
    error = float((got - exact).norm() / exact.norm())
    assert error < float((all_compressed - exact).norm() / exact.norm())


def test_compressed_context_quality(model_and_tokenizer, calibration_file):
    """Compressed-context decode on held-out code with exact sinks: KVTC K2V4
    (48 B) stays usable, and compressing the sinks too is far worse (the
    reason the layout keeps them exact)."""
    model, tokenizer = model_and_tokenizer
    calibration = load_calibration(calibration_file)
    sequences = list(token_sequences(tokenizer, "eval", 256 + 32, 2))
    method = kvtc_method(calibration, "KVTC K2V4")
    with_sinks, no_sinks, int4 = evaluate_methods(
        model, sequences, 256, [(method, ExactTokens(4, 0)), (method, ExactTokens(0, 0)),
                                (int_per_token_head_method(64, 4), ExactTokens(4, 0))])
    assert with_sinks.bytes_per_token_head == 48 and int4.bytes_per_token_head == 72
    # bounds from this test's small calibration (4 x 256 tokens); the benchmark's
    # larger one does better (docs/kvtc-eval.md)
    assert with_sinks.top1 >= 0.6 and with_sinks.kl < 1.0
    assert with_sinks.kl < 0.75 * no_sinks.kl
    assert max(with_sinks.layer_rel_error.values()) < 1.0


def test_collector_sees_post_rope_keys(model_and_tokenizer):
    """Keys reach the collector after RoPE: the same token at two positions
    gives different keys but equal norms per rotated pair (a rotation)."""
    model, _ = model_and_tokenizer
    collector = KVCollector(skip_tokens=0)
    token = 1000
    with attention_override(model, collector), torch.no_grad():
        model(input_ids=torch.tensor([[token] * 8]), use_cache=False)
    sample = collector.layers[0].samples["keys"][0]  # [8, H, d]
    first, later = sample[0], sample[5]
    assert not torch.allclose(first, later, atol=1e-3)
    half = first.shape[-1] // 2
    pair_norm = lambda x: x[..., :half] ** 2 + x[..., half:] ** 2  # noqa: E731
    # layer 0 sees only token embeddings, so the pre-RoPE keys are identical
    torch.testing.assert_close(pair_norm(first), pair_norm(later), rtol=1e-3, atol=1e-4)
