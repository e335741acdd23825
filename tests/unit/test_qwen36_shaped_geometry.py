"""The Qwen3.6-shaped test model's configuration: the real per-layer geometry,
read the way transformers and the capacity planner read it."""

import json

from lnarize_serve import plan
from tests.fixtures import qwen36_shaped


def test_layer_layout_and_head_geometry_are_qwen36_27bs():
    text = qwen36_shaped.config_dict()["text_config"]
    assert text["num_hidden_layers"] == 64 == len(text["layer_types"])
    full = [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    assert full == list(range(3, 64, 4))  # 16 x (3 Gated DeltaNet -> 1 attention)
    assert text["layer_types"].count("linear_attention") == 48
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (24, 4, 256)
    assert text["partial_rotary_factor"] == 0.25 and text["attn_output_gate"]
    # vLLM's fused RoPE needs the mrope sections to cover half the rotary dims.
    rotary_dim = int(text["head_dim"] * text["partial_rotary_factor"])
    assert sum(text["rope_parameters"]["mrope_section"]) == rotary_dim // 2
    linear = (
        text["linear_num_key_heads"], text["linear_num_value_heads"],
        text["linear_key_head_dim"], text["linear_value_head_dim"], text["linear_conv_kernel_dim"],
    )
    assert linear == (16, 48, 128, 128, 4)
    assert text["mtp_num_hidden_layers"] == 1 and text["mamba_ssm_dtype"] == "float32"


def test_transformers_reads_the_config_as_qwen3_5(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(qwen36_shaped.config_dict()))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == "Qwen3_5Config"
    assert config.architectures == ["Qwen3_5ForConditionalGeneration"]
    text = config.get_text_config()
    assert type(text).__name__ == "Qwen3_5TextConfig"
    assert text.layer_types == qwen36_shaped.LAYER_TYPES
    assert text.hidden_size == qwen36_shaped.HIDDEN and text.vocab_size == qwen36_shaped.VOCAB
    assert config.vision_config.out_hidden_size == text.hidden_size


def test_the_planner_sees_the_built_in_qwen36_geometry():
    geometry = plan.geometry_from_hf_config(qwen36_shaped.config_dict(), name="qwen36-shaped")
    assert geometry.num_attention_layers == plan.QWEN36_27B.num_attention_layers == 16
    assert geometry.num_draft_attention_layers == plan.QWEN36_27B.num_draft_attention_layers == 1
    assert geometry.num_kv_heads == plan.QWEN36_27B.num_kv_heads
    assert geometry.head_dim == plan.QWEN36_27B.head_dim
    assert geometry.max_position_embeddings == plan.QWEN36_27B.max_position_embeddings
    assert geometry.linear == plan.QWEN36_27B.linear


def test_token_ids_in_the_config_name_tokens_of_the_vocabulary():
    config = qwen36_shaped.config_dict()
    ids = {config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    ids |= {config["text_config"]["bos_token_id"], config["text_config"]["eos_token_id"]}
    assert max(ids) < len(qwen36_shaped.SPECIAL_TOKENS) <= qwen36_shaped.VOCAB
    assert len(qwen36_shaped.SPECIAL_TOKENS) + 256 + len(qwen36_shaped.ADDED_TOKENS) <= qwen36_shaped.VOCAB


def test_nvfp4_lists_cover_every_language_model_linear_once():
    quantized = set(qwen36_shaped.quantized_modules())
    excluded = qwen36_shaped.exclude_modules()
    assert len(quantized) == 48 * 6 + 16 * 7
    assert not quantized & set(excluded)
    assert {"lm_head", "model.visual*", "mtp*"} <= set(excluded)
    assert len([e for e in excluded if e.endswith(".linear_attn.in_proj_a")]) == 48
    fused = [m for group in qwen36_shaped.fused_groups() for m in group]
    assert len(fused) == len(set(fused)) and set(fused) <= quantized
