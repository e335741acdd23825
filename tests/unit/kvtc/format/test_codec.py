import pytest
import torch

from lnarize_serve.kvtc.format.codec import KindCodec, LayerCodec, decode_kv, encode_kv, roundtrip_kv
from lnarize_serve.kvtc.format.fit import random_layer_codec, sample_from_statistics
from lnarize_serve.kvtc.format.quantizer import allocate_bits, fit_uniform_quantizer, gaussian_unit_samples


@pytest.fixture(scope="module")
def k2v4():
    return random_layer_codec(num_kv_heads=3, head_dim=64, key_bits_per_dim=2,
                              value_bits_per_dim=4, seed=0)


def test_layer_bytes_and_stacked_form(k2v4):
    layer, _ = k2v4
    assert (layer.key_bytes, layer.value_bytes, layer.slot_bytes) == (16, 32, 48)
    for part, budget in ((layer.keys, 128), (layer.values, 256)):
        assert part.bits.sum(dim=1).tolist() == [budget] * 3  # whole budget used
        assert part.basis.shape[0] == 3 and part.basis.shape[2] == 64
        # stored offsets are word packed: no code straddles a 32-bit word
        active = part.bits > 0
        assert bool(((part.bit_offset % 32 + part.bits <= 32) | ~active).all())
        # widths are non-increasing within a head (kernels tile by width)
        assert bool((part.bits[:, 1:] <= part.bits[:, :-1]).all())
        padding = part.bits == 0
        assert float(part.basis[padding].abs().sum()) == 0.0
    args = layer.kernel_args()
    assert args["k_basis"].shape[:2] == args["k_bits"].shape and args["slot_bytes"] == 48
    head = layer.keys.head(1)
    assert head.basis.shape[0] == int((layer.keys.bits[1] > 0).sum())


def test_encode_decode_round_trip(k2v4):
    layer, stats = k2v4
    generator = torch.Generator().manual_seed(1)
    k = sample_from_statistics(stats["keys"], 2000, generator)
    v = sample_from_statistics(stats["values"], 2000, generator)
    slots = encode_kv(k, v, layer)
    assert slots.shape == (2000, 3, 48) and slots.dtype == torch.uint8
    k_hat, v_hat = decode_kv(slots, layer)
    k_ref, v_ref = roundtrip_kv(k, v, layer)
    assert torch.equal(k_hat, k_ref) and torch.equal(v_hat, v_ref)
    # re-encoding a decoded vector is a fixed point of the codec
    assert torch.equal(encode_kv(k_hat, v_hat, layer), slots)
    # error budget: on matching Gaussian data, K2 ~ 0.14 and V4 ~ 0.045 relative
    rel_k = (k_hat - k).norm() / (k - k.mean(0)).norm()
    rel_v = (v_hat - v).norm() / (v - v.mean(0)).norm()
    assert rel_k < 0.2 and rel_v < 0.07


def test_more_bits_less_error():
    errors = []
    for bits in (1, 2, 4, 8):
        layer, stats = random_layer_codec(2, 64, bits, bits, seed=3)
        x = sample_from_statistics(stats["keys"], 1000, torch.Generator().manual_seed(0))
        k_hat = layer.keys.decode_codes(layer.keys.encode_codes(x))
        errors.append(float((k_hat - x).norm() / (x - x.mean(0)).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


def test_gaussian_steps_match_known_optimum():
    # Max (1960): optimal uniform step for a unit Gaussian, 1..4 bits
    expected = {1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335}
    samples = gaussian_unit_samples(20000).unsqueeze(0)
    for bits, step in expected.items():
        scale, _, _ = fit_uniform_quantizer(samples, bits)
        assert abs(float(scale[0]) - step) / step < 0.02


def test_allocation_is_optimal_on_small_problem():
    import itertools
    generator = torch.Generator().manual_seed(5)
    table = torch.rand(4, 4, generator=generator).sort(dim=1, descending=True).values
    bits = allocate_bits(table, 5)
    best = min((sum(float(table[c, w]) for c, w in enumerate(ws)), ws)
               for ws in itertools.product(range(4), repeat=4) if sum(ws) <= 5)
    assert abs(sum(float(table[c, w]) for c, w in enumerate(bits.tolist())) - best[0]) < 1e-9


def test_invalid_codecs_are_rejected(k2v4):
    layer, _ = k2v4
    keys = layer.keys
    with pytest.raises(ValueError, match="padding"):
        bad = keys.bits.clone()
        bad[0, 0] = 0
        KindCodec(keys.mean, keys.basis, bad, keys.scale, keys.zero, keys.bit_offset,
                  keys.num_bytes)
    with pytest.raises(ValueError, match="more than"):
        KindCodec(keys.mean, keys.basis, keys.bits, keys.scale, keys.zero, keys.bit_offset,
                  keys.num_bytes - 1)
    with pytest.raises(ValueError, match="overlap"):
        KindCodec(keys.mean, keys.basis, keys.bits, keys.scale, keys.zero,
                  torch.zeros_like(keys.bit_offset), keys.num_bytes)
    with pytest.raises(ValueError, match="must be"):
        encode_kv(torch.zeros(2, 4, 64), torch.zeros(2, 4, 64), layer)
    with pytest.raises(ValueError, match="uint8"):
        decode_kv(torch.zeros(2, 3, 40, dtype=torch.uint8), layer)
    other, _ = random_layer_codec(2, 64, seed=1)
    with pytest.raises(ValueError, match="KV heads"):
        LayerCodec(layer.keys, other.values)
