"""The Qwen3.6-shaped test model as built by its command line: transformers
loads and runs the bf16 variant; vLLM 0.32's real qwen3_5 classes (target and
MTP draft) load both variants with every tensor placed, and serve the NVFP4
layers with the values the bf16 weights had, within FP4 error; vLLM's CPU
engine generates from the bf16 variant with MTP speculative decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import qwen36_shaped

REPO = Path(__file__).resolve().parents[3]
LOADER = Path(__file__).with_name("vllm_load.py")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen36-shaped")
    result = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.qwen36_shaped", str(out), "--both"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _vllm_load(tmp_path, *args) -> dict:
    sys.path.insert(0, str(LOADER.parent))
    try:
        import vllm_load
    finally:
        sys.path.pop(0)
    stand_in = tmp_path / "stand-in" / "torchvision"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text(vllm_load.TORCHVISION_STAND_IN)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(stand_in.parent), str(REPO)]),
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    result = subprocess.run(
        [sys.executable, str(LOADER), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def test_command_line_writes_both_variants(built):
    out, stdout = built
    assert f"bf16: {out / 'bf16'}" in stdout and f"nvfp4: {out / 'nvfp4'}" in stdout
    for variant in ("bf16", "nvfp4"):
        names = {p.name for p in (out / variant).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert (out / "nvfp4" / "hf_quant_config.json").is_file()
    config = json.loads((out / "nvfp4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert (out / "nvfp4" / "model.safetensors").stat().st_size < (out / "bf16" / "model.safetensors").stat().st_size / 3


def test_checkpoint_tensors_are_laid_out_as_the_real_checkpoints(built):
    from safetensors import safe_open

    out, _ = built
    with safe_open(str(out / "nvfp4" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        mtp = sorted(n for n in names if n.startswith("mtp."))
        assert len(mtp) == 15  # fc, 3 norms, one bf16 decoder layer
        assert all(f.get_slice(n).get_dtype() == "BF16" for n in mtp)
        q_proj = "model.language_model.layers.3.self_attn.q_proj"
        assert f.get_slice(f"{q_proj}.weight").get_shape() == [24 * 256 * 2, qwen36_shaped.HIDDEN // 2]
        assert f.get_slice(f"{q_proj}.weight").get_dtype() == "U8"
        assert f.get_slice(f"{q_proj}.weight_scale").get_dtype() == "F8_E4M3"
        assert f.get_slice(f"{q_proj}.weight_scale_2").get_shape() == []
        conv = "model.language_model.layers.0.linear_attn.conv1d.weight"
        assert f.get_slice(conv).get_shape() == [2 * 16 * 128 + 48 * 128, 1, 4]
        assert f.get_slice(conv).get_dtype() == "BF16"
        for module in qwen36_shaped.quantized_modules():
            assert {f"{module}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")} <= names
        assert not any(n.startswith(tuple(qwen36_shaped.exclude_modules()[1:-2])) and "scale" in n for n in names)


def test_transformers_loads_and_runs_the_bf16_variant(built):
    import torch
    from transformers import AutoTokenizer, Qwen3_5ForConditionalGeneration

    out, _ = built
    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(
        out / "bf16", dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    tokenizer = AutoTokenizer.from_pretrained(out / "bf16")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt + "<think>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == tokenizer.convert_tokens_to_ids("<think>")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], qwen36_shaped.VOCAB)
    assert torch.isfinite(logits).all()


def test_vllm_loads_the_nvfp4_variant_with_mtp_and_serves_the_bf16_values(built, tmp_path):
    out, _ = built
    report = _vllm_load(tmp_path, out / "nvfp4", out / "bf16")
    assert report["quantization"] == "modelopt_fp4"
    assert (report["target_class"], report["draft_class"]) == ("Qwen3_5ForConditionalGeneration", "Qwen3_5MTP")
    assert report["vision_tower"] == "StageMissingLayer"  # language model only
    expected = []
    for i, layer_type in enumerate(qwen36_shaped.LAYER_TYPES):
        mixer = ("self_attn.qkv_proj", "self_attn.o_proj") if layer_type == "full_attention" else (
            "linear_attn.in_proj_qkvz", "linear_attn.out_proj")
        expected += [f"language_model.model.layers.{i}.{m}" for m in (*mixer, "mlp.gate_up_proj", "mlp.down_proj")]
    assert report["quantized"] == sorted(expected)
    # bf16 linears: 48 in_proj_ba + 48 conv1d + lm_head; the whole MTP head
    assert report["target_methods"]["UnquantizedLinearMethod"] == 97
    assert report["draft_quantized"] == []
    assert report["compared_layers"] == 256
    assert report["worst_relative_error"] < 0.12


def test_vllm_loads_the_bf16_variant_with_mtp(built, tmp_path):
    out, _ = built
    report = _vllm_load(tmp_path, out / "bf16")
    assert report["quantization"] is None
    assert report["draft_class"] == "Qwen3_5MTP"
    assert report["quantized"] == [] and report["parameter_dtypes"] == ["torch.bfloat16"]


def test_cpu_engine_generates_from_the_bf16_variant_with_mtp(built, tmp_path):
    out, _ = built
    report = _vllm_load(tmp_path, "--generate", out / "bf16")
    assert report["architecture"] == "Qwen3_5ForConditionalGeneration"
    assert report["generated_tokens"] == 32
    # random weights: drafts are proposed and verified, hardly ever accepted
    assert report["spec_decode"]["vllm:spec_decode_num_draft_tokens"] == 3 * report["spec_decode"]["vllm:spec_decode_num_drafts"] > 0


def test_the_servers_default_parsers_accept_the_tokenizer(built):
    from vllm.reasoning import ReasoningParserManager
    from vllm.tokenizers import get_tokenizer
    from vllm.tool_parsers import ToolParserManager

    out, _ = built
    tokenizer = get_tokenizer(str(out / "nvfp4"))
    ReasoningParserManager.get_reasoning_parser("qwen3")(tokenizer)  # needs <think> and </think>
    from lnarize_serve.vllm_compat.choices import register_project_tool_parsers

    register_project_tool_parsers()
    ToolParserManager.get_tool_parser("qwen3_xml_schema")(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(qwen36_shaped.ADDED_TOKENS))
    assert all(i < qwen36_shaped.VOCAB for i in ids) and len(set(ids)) == 4
