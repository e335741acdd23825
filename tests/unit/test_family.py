"""Family detection from config.json / hf_quant_config.json (real shapes: tests/fixtures/family_configs.py)."""

import json

import pytest

from lnarize_serve import family
from lnarize_serve.family import CheckpointError, contradictions, detect_checkpoint, read_checkpoint
from lnarize_serve.settings import load_settings
from tests.fixtures import family_configs

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.mark.parametrize(
    ("name", "quantization", "weight_format", "vision"),
    [
        ("text-nvfp4-mtp", family.MODELOPT_NVFP4, "nvfp4", False),
        ("vlm-nvfp4-mtp", family.MODELOPT_NVFP4, "nvfp4", True),
        ("vlm-fp8-mtp", family.MODELOPT_FP8, "fp8", True),
        ("vlm-int4-mtp", family.INT4_AUTOROUND_GPTQ, "int4", True),
        ("text-ct-nvfp4-mtp", family.COMPRESSED_TENSORS, "nvfp4", False),
        ("vlm-bf16-mtp", family.UNQUANTIZED, "bf16", True),
    ],
)
def test_each_family_member_is_recognised(name, quantization, weight_format, vision):
    config, hf_quant = family_configs.FAMILIES[name]
    facts = detect_checkpoint(config, hf_quant)
    assert (facts.quantization, facts.weight_format, facts.vision) == (quantization, weight_format, vision)
    assert facts.mtp_layers == 1 and facts.hybrid
    assert facts.family == name


def test_modelopt_is_recognised_from_hf_quant_config_alone():
    config, hf_quant = family_configs.text_nvfp4_mtp()
    del config["quantization_config"]
    assert detect_checkpoint(config, hf_quant).quantization == family.MODELOPT_NVFP4
    assert detect_checkpoint(config).quantization == family.UNQUANTIZED


def test_mtp_depth_reads_mtp_num_hidden_layers_and_the_qwen3_next_name():
    config, _ = family_configs.text_nvfp4_mtp()
    config["mtp_num_hidden_layers"] = 2
    assert detect_checkpoint(config).mtp_layers == 2
    assert detect_checkpoint(family_configs.qwen3_next_style_mtp()).mtp_layers == 1
    assert detect_checkpoint(family_configs.text_nvfp4_without_mtp()[0]).mtp_layers == 0


def test_a_plain_transformer_is_neither_hybrid_nor_quantized():
    facts = detect_checkpoint({"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9})
    assert (facts.hybrid, facts.vision, facts.has_mtp, facts.quantization) == (False, False, False, "none")
    assert facts.family == "text-bf16"


def test_unsupported_quantization_is_named():
    config = family_configs.text_bf16()
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    with pytest.raises(CheckpointError, match="bitsandbytes"):
        detect_checkpoint(config)


def test_local_folder_is_read_with_its_hf_quant_config(tmp_path):
    config, hf_quant = family_configs.vlm_nvfp4_mtp()
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    facts = read_checkpoint(str(tmp_path))
    assert facts.family == "vlm-nvfp4-mtp" and facts.source == str(tmp_path / "config.json")


def test_hub_repo_is_read_from_the_cache_only_unless_online_is_allowed(tmp_path, monkeypatch):
    # A hub cache laid out the way huggingface_hub writes it, no network.
    repo = tmp_path / "models--org--model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text(json.dumps(family_configs.vlm_int4_autoround_mtp()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    facts = read_checkpoint("org/model", cache_dir=tmp_path)
    assert facts is not None and facts.family == "vlm-int4-mtp"
    assert read_checkpoint("org/other", cache_dir=tmp_path) is None
    # Online allowed but the Hub unreachable: the cached config still decides,
    # without the optional hf_quant_config.json (no network here: faked).
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def unreachable(*args, local_files_only=False, **kwargs):
        if local_files_only:
            return real(*args, local_files_only=True, **kwargs)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert read_checkpoint("org/model", cache_dir=tmp_path, online=True).family == "vlm-int4-mtp"


def test_explicit_quantization_contradicting_the_checkpoint_names_both(monkeypatch):
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "modelopt_fp4")
    facts = detect_checkpoint(family_configs.vlm_int4_autoround_mtp(), source="/ckpt/config.json")
    (line,) = contradictions(load_settings(), facts)
    assert "LNARIZE_QUANTIZATION=modelopt_fp4" in line and "int4_autoround_gptq" in line and "/ckpt/config.json" in line


def test_preset_quantization_is_no_contradiction():
    # The interactive preset says modelopt_fp4; only an explicit value is held against the checkpoint.
    facts = detect_checkpoint(family_configs.vlm_int4_autoround_mtp())
    assert contradictions(load_settings(), facts) == []


@pytest.mark.parametrize("value", ["gptq_marlin", "inc", "auto"])
def test_compatible_explicit_quantization_is_accepted(monkeypatch, value):
    monkeypatch.setenv("LNARIZE_QUANTIZATION", value)
    assert contradictions(load_settings(), detect_checkpoint(family_configs.vlm_int4_autoround_mtp())) == []


def test_checkpoint_method_on_an_unquantized_checkpoint_is_a_contradiction_but_online_fp8_is_not(monkeypatch):
    facts = detect_checkpoint(family_configs.vlm_bf16())
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "modelopt_fp4")
    assert len(contradictions(load_settings(), facts)) == 1
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "fp8")
    assert contradictions(load_settings(), facts) == []


def test_explicit_speculative_tokens_without_an_mtp_head(monkeypatch):
    facts = detect_checkpoint(*family_configs.text_nvfp4_without_mtp())
    assert contradictions(load_settings(), facts) == []  # the preset's 3: adapted, not refused
    monkeypatch.setenv("LNARIZE_SPECULATIVE_TOKENS", "2")
    (line,) = contradictions(load_settings(), facts)
    assert "LNARIZE_SPECULATIVE_TOKENS=2" in line and "MTP head" in line


def test_flags_count_as_explicit():
    settings = load_settings(quantization="modelopt_fp4", port=None)
    assert settings.explicitly_set == frozenset({"quantization"})
