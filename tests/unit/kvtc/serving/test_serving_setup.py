"""KVTC server set-up: calibration source, validation against the model, settings."""

import pytest

from lnarize_serve.kvtc.format.calibration import Calibration, RotaryInfo
from lnarize_serve.kvtc.format.fit import random_layer_codec
from lnarize_serve.kvtc.serving.serving_setup import (
    KVTCSetupError,
    prepare_calibration_file,
    resolve_calibration_source,
    resolve_sink_tokens,
)

SMALL_CONFIG = {
    "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
    "hidden_size": 384, "head_dim": 64, "rope_theta": 10000.0,
}


def _calibration(layers, num_model_layers=4, heads=2, head_dim=64):
    codecs = {i: random_layer_codec(heads, head_dim, seed=i)[0] for i in layers}
    return Calibration("test", head_dim, heads, num_model_layers, codecs, RotaryInfo(head_dim, 10000.0))


def test_matching_calibration_is_accepted_as_is(tmp_path):
    path = _calibration([0, 1, 2, 3]).save(tmp_path / "ok.safetensors")
    assert prepare_calibration_file(path, SMALL_CONFIG, "test", tmp_path / "conv") == path


@pytest.mark.parametrize(
    "layers,model_layers,heads,expected",
    [
        ([0, 1], 4, 2, "missing full-attention layers [2, 3]"),
        ([0, 1, 2, 3], 4, 3, "3 KV heads"),
        ([0, 1, 2, 3, 4, 5], 6, 2, "made for 6 layers"),
    ],
)
def test_mismatched_calibration_is_refused_with_the_reason(tmp_path, layers, model_layers, heads, expected):
    path = _calibration(layers, model_layers, heads).save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        prepare_calibration_file(path, SMALL_CONFIG, "test", tmp_path / "conv")


def test_hybrid_model_needs_only_its_full_attention_layers(tmp_path):
    config = dict(SMALL_CONFIG, full_attention_interval=4)
    path = _calibration([3]).save(tmp_path / "hybrid.safetensors")
    assert prepare_calibration_file(path, {"text_config": config}, "t", tmp_path) == path


def test_a_file_that_is_no_calibration_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="refused to unpickle|not a readable torch file"):
        prepare_calibration_file(path, SMALL_CONFIG, "test", tmp_path / "conv")


def test_calibration_source_local_file_then_model_folder(tmp_path):
    local = tmp_path / "c.safetensors"
    local.write_bytes(b"x")
    assert resolve_calibration_source(str(local), "ignored/repo", None, None) == local
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "kvtc_calibration.pt").write_bytes(b"x")
    found = resolve_calibration_source("kvtc_calibration.pt", str(model_dir), None, None)
    assert found == model_dir / "kvtc_calibration.pt"
    with pytest.raises(KVTCSetupError, match="LNARIZE_KVTC_CALIBRATION='other.pt'") as missing:
        resolve_calibration_source("other.pt", str(model_dir), None, None)
    # the error names the command that makes a calibration for this model
    assert f"lnarize-serve kvtc calibrate --model {model_dir} --out" in str(missing.value)


def test_sink_setting_is_checked_against_the_calibration():
    import torch

    plain = _calibration([0, 1, 2, 3])
    assert resolve_sink_tokens(None, plain) == 0  # unset: compressed, logged
    assert resolve_sink_tokens(0, plain) == 0
    with pytest.raises(KVTCSetupError, match="LNARIZE_KVTC_SINK_TOKENS=1.*no position-0 sink"):
        resolve_sink_tokens(1, plain)
    constants = {i: torch.ones(2, 64) for i in range(4)}
    with_sink = Calibration("test", 64, 2, 4, plain.layers, plain.rotary, sink_tokens=1,
                            sink_keys=constants, sink_values=constants, sink_token_id=1)
    assert resolve_sink_tokens(None, with_sink) == 1
    assert resolve_sink_tokens(0, with_sink) == 0


def test_window_pool_memory_is_reported_for_the_start_up_log():
    from lnarize_serve.kvtc.serving.serving_setup import window_pool_bytes

    # Qwen3.6-27B's shape: 16 full-attention layers, 4 KV heads of 256
    codecs = {i: None for i in range(3, 64, 4)}
    qwen = Calibration.__new__(Calibration)
    object.__setattr__(qwen, "num_kv_heads", 4)
    object.__setattr__(qwen, "head_dim", 256)
    object.__setattr__(qwen, "layers", codecs)
    # entries: per sequence ceil((128 + 15) / 16) + 2 = 11 sub-blocks of 16 slots; + a spare row
    rows = 8 * 11 * 16 + 1
    assert window_pool_bytes(128, 8, qwen) == rows * 2 * 4 * 256 * 2 * 16  # about 92 MB
    assert window_pool_bytes(0, 8, qwen) == 0
