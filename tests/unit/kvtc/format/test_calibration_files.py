"""Calibration files: the shipped pickle (safe loader, refusal of unsafe
pickles), our safetensors format, conversion, and validation against a model."""

import dataclasses
import os
import pickle
import sys
import types

import pytest
import torch

from lnarize_serve.kvtc.format.fit import random_layer_codec
from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.calibration import (Calibration, CalibrationError, RotaryInfo, load_calibration,
                                                   read_metadata, validate_against_model)
from lnarize_serve.kvtc.format.shipped import (convert_shipped, describe_shipped, load_shipped,
                                               neox_rotation_average)

HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 3


def _fake_fork_module(name):
    """The fork's dataclasses under their real module path, so torch.save
    pickles them exactly as the shipped file does."""
    module = types.ModuleType(name)

    @dataclasses.dataclass
    class PCAEntry:
        eigenvectors: torch.Tensor
        eigenvalues: torch.Tensor
        mean: torch.Tensor
        head_indices: list
        kind: str
        bit_budget: int
        pca_mins: torch.Tensor
        pca_maxs: torch.Tensor
        bit_widths: torch.Tensor
        scales: object = None
        zero_points: object = None

    @dataclasses.dataclass
    class CalibrationData:
        entries: dict
        head_group_size: int = 1
        rope_theta: float = 10000.0
        sink_tokens: int = 4
        window_tokens: int = 128

    for cls in (PCAEntry, CalibrationData):
        cls.__module__ = name
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    return module


def write_shipped(path, module_name="kvtc.common", seed=0):
    package = module_name.split(".")[0]
    module = _fake_fork_module(module_name)
    sys.modules[package] = types.ModuleType(package)
    sys.modules[module_name] = module
    try:
        generator = torch.Generator().manual_seed(seed)
        entries = {}
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                for kind, budget in (("keys", 2 * HEAD_DIM), ("values", 4 * HEAD_DIM)):
                    q, _ = torch.linalg.qr(torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))
                    vals = torch.exp(-torch.arange(HEAD_DIM, dtype=torch.float32) / 3)
                    entries[(layer, head, kind)] = module.PCAEntry(
                        eigenvectors=q.T.contiguous(), eigenvalues=vals,
                        mean=torch.randn(HEAD_DIM, generator=generator), head_indices=[head],
                        kind=kind, bit_budget=budget, pca_mins=-3 * vals.sqrt(),
                        pca_maxs=3 * vals.sqrt(),
                        bit_widths=torch.full((HEAD_DIM,), budget // HEAD_DIM))
        torch.save(module.CalibrationData(entries=entries), path)
    finally:
        del sys.modules[module_name], sys.modules[package]


def geometry(num_layers=2 * LAYERS):
    # a hybrid-like model: full attention at every second layer
    return AttentionGeometry.from_config({
        "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "hidden_size": 64, "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "layer_types": ["linear_attention", "full_attention"] * (num_layers // 2)})


@pytest.mark.parametrize("module_name", ["kvtc.common", "src.common"])
def test_shipped_file_loads_safely(tmp_path, module_name):
    path = tmp_path / "kvtc_calibration.pt"
    write_shipped(path, module_name)
    shipped = load_shipped(path)
    info = describe_shipped(shipped)
    assert info["entries"] == LAYERS * KV_HEADS * 2 and info["layers"] == LAYERS
    assert info["bit_budgets"] == {"keys": [2 * HEAD_DIM], "values": [4 * HEAD_DIM]}
    entry = shipped.entries[(1, 0, "values")]
    assert entry.eigenvectors.shape == (HEAD_DIM, HEAD_DIM) and entry.head_indices == [0]
    assert (shipped.sink_tokens, shipped.window_tokens, shipped.rope_theta) == (4, 128, 10000.0)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"entries": _RunsShell(marker)}, path)
    with pytest.raises(CalibrationError, match="refused to unpickle"):
        load_shipped(path)
    assert not marker.exists()


def test_unknown_class_in_allowed_module_is_refused(tmp_path):
    path = tmp_path / "odd.pt"
    sys.modules["kvtc"] = types.ModuleType("kvtc")
    module = types.ModuleType("kvtc.common")

    class Other:
        pass
    Other.__module__ = "kvtc.common"
    Other.__qualname__ = "Other"
    module.Other = Other
    sys.modules["kvtc.common"] = module
    try:
        torch.save(Other(), path)
    finally:
        del sys.modules["kvtc.common"], sys.modules["kvtc"]
    with pytest.raises(CalibrationError, match="kvtc.common.Other"):
        load_shipped(path)


def test_plain_pickle_and_garbage_are_refused(tmp_path):
    path = tmp_path / "plain.pt"
    with open(path, "wb") as handle:
        pickle.dump({"a": 1}, handle, protocol=2)
    with pytest.raises(CalibrationError):
        load_shipped(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(CalibrationError):
        load_shipped(junk)
    dict_file = tmp_path / "dict.pt"
    torch.save({"entries": {}}, dict_file)
    with pytest.raises(CalibrationError, match="not CalibrationData"):
        load_shipped(dict_file)


def test_convert_save_load_validate(tmp_path):
    path = tmp_path / "kvtc_calibration.pt"
    write_shipped(path)
    calibration = convert_shipped(load_shipped(path), geometry(), "test/model", positions=64)
    assert calibration.layer_indices == [1, 3, 5]
    assert (calibration.key_bytes, calibration.value_bytes) == (4, 8)
    assert calibration.rotary == RotaryInfo(rotary_dim=4, rope_theta=1e7)
    out = calibration.save(tmp_path / "ours.safetensors")
    meta = read_metadata(out)
    assert meta["layer_map"] == [1, 3, 5] and meta["key_domain"] == "post_rope"
    assert sum(meta["bit_allocation"]["3"]["values"][1]) <= 64
    loaded = load_calibration(out)
    for index in calibration.layer_indices:
        for kind in ("keys", "values"):
            a, b = calibration.layers[index].kind(kind), loaded.layers[index].kind(kind)
            for name in ("mean", "basis", "bits", "scale", "zero", "bit_offset"):
                assert torch.equal(getattr(a, name), getattr(b, name))
    validate_against_model(loaded, geometry())
    with pytest.raises(CalibrationError, match="layer map mismatch"):
        validate_against_model(loaded, AttentionGeometry(6, (0, 2, 4), KV_HEADS, 4, HEAD_DIM, 4, 1e7))
    with pytest.raises(CalibrationError, match="KV heads"):
        validate_against_model(loaded, AttentionGeometry(6, (1, 3, 5), 4, 4, HEAD_DIM, 4, 1e7))
    with pytest.raises(CalibrationError, match="head_dim"):
        validate_against_model(loaded, AttentionGeometry(6, (1, 3, 5), KV_HEADS, 4, 32, 4, 1e7))
    with pytest.raises(CalibrationError, match="3 layers"):
        convert_shipped(load_shipped(path), geometry(4), "m")


def test_our_format_rejects_foreign_and_inconsistent_files(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CalibrationError, match="without KVTC metadata"):
        load_calibration(plain)
    not_st = tmp_path / "x.safetensors"
    not_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CalibrationError, match="not a safetensors"):
        load_calibration(not_st)
    a, _ = random_layer_codec(KV_HEADS, HEAD_DIM, 2, 4, seed=0)
    b, _ = random_layer_codec(KV_HEADS, HEAD_DIM, 4, 4, seed=0)
    with pytest.raises(CalibrationError, match="disagree"):
        Calibration("m", HEAD_DIM, KV_HEADS, 4, {0: a, 1: b}, RotaryInfo(HEAD_DIM, 1e4))


def test_sink_constants_round_trip(tmp_path):
    layer, _ = random_layer_codec(KV_HEADS, HEAD_DIM, 2, 4, seed=0)
    generator = torch.Generator().manual_seed(0)
    sink_k = {1: torch.randn(KV_HEADS, HEAD_DIM, generator=generator)}
    sink_v = {1: torch.randn(KV_HEADS, HEAD_DIM, generator=generator)}
    calibration = Calibration("m", HEAD_DIM, KV_HEADS, 2, {1: layer}, RotaryInfo(HEAD_DIM, 1e4),
                              sink_tokens=1, sink_keys=sink_k, sink_values=sink_v, sink_token_id=7)
    loaded = load_calibration(calibration.save(tmp_path / "c.safetensors"))
    assert loaded.sink_token_id == 7 and loaded.sink_tokens == 1
    assert torch.equal(loaded.sink_keys[1], sink_k[1]) and torch.equal(loaded.sink_values[1], sink_v[1])
    with pytest.raises(CalibrationError, match="sink_token_id"):
        Calibration("m", HEAD_DIM, KV_HEADS, 2, {1: layer}, RotaryInfo(HEAD_DIM, 1e4),
                    sink_keys=sink_k, sink_values=sink_v)
    with pytest.raises(CalibrationError, match="shape"):
        Calibration("m", HEAD_DIM, KV_HEADS, 2, {1: layer}, RotaryInfo(HEAD_DIM, 1e4),
                    sink_keys={1: torch.zeros(3)}, sink_values=sink_v, sink_token_id=1)


def test_rope_average_matches_sampling():
    generator = torch.Generator().manual_seed(0)
    d, positions, theta = 8, 32, 100.0
    mix = torch.randn(d, d, generator=generator)
    mean = torch.randn(d, generator=generator)
    cov = mix @ mix.T / d
    got_mean, got_cov = neox_rotation_average(mean, cov + torch.outer(mean, mean), theta, positions)
    x = mean + torch.randn(200_000, d, generator=generator) @ torch.linalg.cholesky(cov).T
    pos = torch.randint(0, positions, (x.shape[0],), generator=generator).double()
    inv = theta ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    cos, sin = torch.cos(pos[:, None] * inv), torch.sin(pos[:, None] * inv)
    x1, x2 = x[:, : d // 2].double(), x[:, d // 2:].double()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=1)
    torch.testing.assert_close(got_mean.double(), rotated.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(got_cov.double(), torch.cov(rotated.T), atol=0.03, rtol=0)
