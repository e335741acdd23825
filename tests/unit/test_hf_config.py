"""The attention facts of a HF config, read once for the capacity planner and
the KVTC calibration check."""

import pytest

from lnarize_serve import plan
from lnarize_serve.hf_config import AttentionGeometry, text_config

LLAMA = {  # SmolLM2-135M's config.json, the fields that matter
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "hidden_size": 576, "rope_theta": 100000,
}

QWEN36_SHAPED = {  # multimodal wrapper; rotary facts in rope_parameters
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "text_config": {
        "num_hidden_layers": 8, "num_attention_heads": 24, "num_key_value_heads": 4,
        "head_dim": 256, "hidden_size": 5120, "full_attention_interval": 4,
        "rope_parameters": {"rope_theta": 10000000, "partial_rotary_factor": 0.25},
        "linear_num_key_heads": 16, "linear_num_value_heads": 48, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32",
        "dtype": "bfloat16", "mtp_num_hidden_layers": 1,
    },
}


def test_a_plain_decoder_is_all_full_attention_with_head_dim_from_the_hidden_size():
    g = AttentionGeometry.from_config(LLAMA)
    assert g.num_layers == 30 and g.full_attention_layers == tuple(range(30))
    assert g.linear_attention_layers == ()
    assert (g.num_q_heads, g.num_kv_heads, g.head_dim) == (9, 3, 64)
    assert (g.rotary_dim, g.rope_theta) == (64, 100000.0)


def test_a_hybrid_multimodal_config_reads_its_text_part():
    g = AttentionGeometry.from_config(QWEN36_SHAPED)
    assert g.full_attention_layers == (3, 7)
    assert g.linear_attention_layers == (0, 1, 2, 4, 5, 6)
    assert (g.num_q_heads, g.num_kv_heads, g.head_dim) == (24, 4, 256)
    assert (g.rotary_dim, g.rope_theta) == (64, 1e7)


def test_explicit_layer_types_win_over_the_interval():
    config = dict(LLAMA, num_hidden_layers=3, full_attention_interval=2,
                  layer_types=["sliding_attention", "full_attention", "full_attention"])
    g = AttentionGeometry.from_config(config)
    assert g.full_attention_layers == (1, 2) and g.linear_attention_layers == ()


@pytest.mark.parametrize("kv_heads", [{}, {"num_key_value_heads": None}])
def test_without_kv_heads_every_query_head_has_its_own(kv_heads):
    config = {k: v for k, v in LLAMA.items() if k != "num_key_value_heads"} | kv_heads
    assert AttentionGeometry.from_config(config).num_kv_heads == 9


def test_a_transformers_config_object_reads_like_its_dict():
    class Config:  # what transformers' PretrainedConfig offers the reader
        def to_dict(self):
            return QWEN36_SHAPED

    assert AttentionGeometry.from_config(Config()) == AttentionGeometry.from_config(QWEN36_SHAPED)
    assert text_config(Config()) is QWEN36_SHAPED["text_config"]


@pytest.mark.parametrize("config", [LLAMA, QWEN36_SHAPED], ids=["llama", "qwen36-shaped"])
def test_the_planner_counts_the_layers_and_heads_the_calibration_check_sees(config):
    attention = AttentionGeometry.from_config(config)
    planned = plan.geometry_from_hf_config(config)
    assert planned.num_attention_layers == len(attention.full_attention_layers)
    assert planned.num_kv_heads == attention.num_kv_heads
    assert planned.head_dim == attention.head_dim
    linear = planned.linear.num_layers if planned.linear else 0
    assert linear == len(attention.linear_attention_layers)
