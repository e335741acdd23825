"""Family x GPU preset -> engine arguments, pinned (config shapes: tests/fixtures/family_configs.py).

No GPU on the test machine: GPU facts are given to the pure planner, or to
`resolve_launch` through its probe argument.
"""

import json

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from lnarize_serve.engine import resolve_launch
from lnarize_serve.engine_args import engine_arg_values
from lnarize_serve.family import detect_checkpoint
from lnarize_serve.gpu import GpuFacts, profile_for
from lnarize_serve.launch import plan_launch
from lnarize_serve.settings import ConfigError, load_settings
from tests.fixtures import family_configs

GIB = 2**30
GPUS = {
    "sm120": GpuFacts("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0), 96 * 10**9, (12, 9)),
    "b200": GpuFacts("NVIDIA B200", (10, 0), 179 * GIB, (12, 9)),
    "gb10": GpuFacts("NVIDIA GB10", (12, 1), 119 * GIB, (13, 0), unified_memory=True),
    "hopper": GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 80 * GIB, (12, 8)),
    "none": GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB, (12, 8)),
}

PIECEWISE = {"compilation_config": {"cudagraph_mode": "PIECEWISE"}}
NO_GRAPHS = {"compilation_config": {"cudagraph_mode": "NONE"}}
GB10 = {"attention_backend": "TRITON_ATTN", "max_num_batched_tokens": 8192}
CUTLASS = {"kernel_config": {"linear_backend_per_quant": {"nvfp4_w4a4": "cutlass"}}}
MARLIN = {"kernel_config": {"linear_backend_per_quant": {"nvfp4_w4a4": "marlin"}}}

# family -> (quantization, speculative tokens, dtype)
FAMILY_SETTINGS = {
    "text-nvfp4-mtp": ("modelopt_fp4", 3, "auto"),
    "vlm-nvfp4-mtp": ("modelopt_fp4", 3, "auto"),
    "vlm-fp8-mtp": ("modelopt", 3, "auto"),
    "vlm-int4-mtp": (None, 1, "float16"),
    "text-ct-nvfp4-mtp": ("compressed-tensors", 3, "auto"),
    "vlm-bf16-mtp": (None, 3, "auto"),
}
# (family, preset) -> engine arguments the preset adds besides mamba_cache_mode=align
PRESET_ARGS = {
    ("text-nvfp4-mtp", "sm120"): PIECEWISE,
    ("text-nvfp4-mtp", "b200"): {},
    ("text-nvfp4-mtp", "gb10"): {**PIECEWISE, **CUTLASS, **GB10},
    ("text-nvfp4-mtp", "hopper"): MARLIN,
    ("text-nvfp4-mtp", "none"): {},
    ("vlm-nvfp4-mtp", "sm120"): PIECEWISE,
    ("vlm-nvfp4-mtp", "b200"): {},
    ("vlm-nvfp4-mtp", "gb10"): {**PIECEWISE, **CUTLASS, **GB10},
    ("vlm-nvfp4-mtp", "hopper"): MARLIN,
    ("vlm-nvfp4-mtp", "none"): {},
    ("vlm-fp8-mtp", "sm120"): PIECEWISE,
    ("vlm-fp8-mtp", "b200"): {},
    ("vlm-fp8-mtp", "gb10"): {**PIECEWISE, **GB10},
    ("vlm-fp8-mtp", "hopper"): {},
    ("vlm-fp8-mtp", "none"): {},
    ("vlm-int4-mtp", "sm120"): NO_GRAPHS,
    ("vlm-int4-mtp", "b200"): {},
    ("vlm-int4-mtp", "gb10"): {**NO_GRAPHS, **GB10},
    ("vlm-int4-mtp", "hopper"): {},
    ("vlm-int4-mtp", "none"): {},
    ("text-ct-nvfp4-mtp", "sm120"): PIECEWISE,
    ("text-ct-nvfp4-mtp", "b200"): {},
    ("text-ct-nvfp4-mtp", "gb10"): {**PIECEWISE, **CUTLASS, **GB10},
    ("text-ct-nvfp4-mtp", "hopper"): MARLIN,
    ("text-ct-nvfp4-mtp", "none"): {},
    ("vlm-bf16-mtp", "sm120"): PIECEWISE,
    ("vlm-bf16-mtp", "b200"): {},
    ("vlm-bf16-mtp", "gb10"): {**PIECEWISE, **GB10},
    ("vlm-bf16-mtp", "hopper"): {},
    ("vlm-bf16-mtp", "none"): {},
}
LAUNCH_KEYS = {"compilation_config", "kernel_config", "attention_backend", "max_num_batched_tokens"}
# (family, preset) -> (sampling defaults, thinking default) the pair supplies; others: none.
# The Cascade NVFP4-MTP card on GB10: never greedy (temperature 0 loops), thinking off.
CARD_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}
REQUEST_DEFAULTS = {("text-nvfp4-mtp", "gb10"): (CARD_SAMPLING, False)}

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.mark.parametrize(("family", "preset"), sorted(PRESET_ARGS))
def test_engine_arguments_for_each_family_on_each_gpu_preset(family, preset):
    config, hf_quant = family_configs.FAMILIES[family]
    launch = plan_launch(load_settings(), detect_checkpoint(config, hf_quant), GPUS[preset])
    assert launch.gpu_profile == preset
    values = engine_arg_values(launch.settings, "/ckpt", launch)
    quantization, tokens, dtype = FAMILY_SETTINGS[family]
    assert values["quantization"] == quantization
    assert values["speculative_config"] == {"method": "mtp", "num_speculative_tokens": tokens}
    assert values["dtype"] == dtype
    assert values["gpu_memory_utilization"] == (0.7 if preset == "gb10" else 0.85)
    assert values["mamba_cache_mode"] == "align"
    assert {k: v for k, v in values.items() if k in LAUNCH_KEYS} == PRESET_ARGS[(family, preset)]
    sampling, thinking = REQUEST_DEFAULTS.get((family, preset), ({}, None))
    assert launch.settings.sampling_defaults == sampling
    assert values.get("override_generation_config") == (sampling or None)
    assert launch.settings.thinking_default is thinking
    # Every combination is accepted by vLLM's own argument class.
    AsyncEngineArgs(**values)
    # Each choice says why.
    assert all(choice.why for choice in launch.choices)


@pytest.mark.parametrize("preset", sorted(GPUS))
def test_the_gpu_selects_its_preset(preset):
    assert profile_for(GPUS[preset])[0] == preset
    assert profile_for(GpuFacts("NVIDIA GeForce RTX 5090", (12, 0), 32 * GIB))[0] == "sm120"
    assert profile_for(None)[0] == "none"


def test_forced_profile_wins_over_the_gpu(monkeypatch):
    monkeypatch.setenv("LNARIZE_GPU_PROFILE", "gb10")
    launch = plan_launch(load_settings(), None, GPUS["hopper"])
    assert launch.gpu_profile == "gb10" and "LNARIZE_GPU_PROFILE=gb10" in launch.gpu_profile_reason


def test_explicit_settings_are_not_moved_by_a_preset(monkeypatch):
    monkeypatch.setenv("LNARIZE_GPU_MEM_UTIL", "0.8")
    monkeypatch.setenv("LNARIZE_SPECULATIVE_TOKENS", "3")
    config = family_configs.vlm_int4_autoround_mtp()
    launch = plan_launch(load_settings(), detect_checkpoint(config), GPUS["gb10"])
    assert launch.settings.gpu_mem_util == 0.8
    assert launch.settings.speculative_tokens == 3  # the card's n=1 applies to the preset's value only


def test_escape_hatch_still_overrides_a_preset(monkeypatch):
    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", '{"max_num_batched_tokens": 4096}')
    launch = plan_launch(load_settings(), None, GPUS["gb10"])
    assert engine_arg_values(launch.settings, None, launch)["max_num_batched_tokens"] == 4096


def test_preset_mtp_on_a_checkpoint_without_head_is_switched_off():
    launch = plan_launch(load_settings(), detect_checkpoint(*family_configs.text_nvfp4_without_mtp()), GPUS["b200"])
    assert engine_arg_values(launch.settings, None, launch)["speculative_config"] is None


def test_more_than_four_mtp_tokens_on_a_hybrid_is_refused(monkeypatch):
    monkeypatch.setenv("LNARIZE_SPECULATIVE_TOKENS", "5")
    with pytest.raises(ConfigError, match=r"LNARIZE_SPECULATIVE_TOKENS=5: more than 4 MTP tokens .*gdn_attn"):
        plan_launch(load_settings(), None, GPUS["sm120"])
    monkeypatch.setenv("LNARIZE_SPECULATIVE_TOKENS", "4")
    plan_launch(load_settings(), None, GPUS["sm120"])


def test_contradiction_is_a_start_up_error(monkeypatch):
    monkeypatch.setenv("LNARIZE_QUANTIZATION", "modelopt_fp4")
    with pytest.raises(ConfigError, match="LNARIZE_QUANTIZATION=modelopt_fp4 contradicts"):
        plan_launch(load_settings(), detect_checkpoint(family_configs.vlm_int4_autoround_mtp()), None)


def test_hybrid_mtp_on_a_gpu_asks_for_expandable_segments():
    launch = plan_launch(load_settings(), None, GPUS["hopper"])
    assert launch.environment == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert plan_launch(load_settings(), None, None).environment == {}


def test_cpu_demo_gets_no_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    settings = load_settings()
    launch = resolve_launch(settings, str(folder), online=False, probe=lambda: None)
    assert launch.gpu_profile == "none" and launch.engine_args == {} and launch.environment == {}
    assert engine_arg_values(settings, str(folder), launch) == engine_arg_values(settings, str(folder))


def test_config_without_the_cached_checkpoint_shows_the_preset_assumptions(tmp_path, monkeypatch, capsys):
    from lnarize_serve import cli

    monkeypatch.setenv("LNARIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: GPUS["sm120"])
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "showing the preset's assumptions" in out
    assert "gpu_profile: sm120" in out and '"cudagraph_mode": "PIECEWISE"' in out


def test_config_reads_a_cached_checkpoint_and_names_its_family(tmp_path, monkeypatch, capsys):
    from lnarize_serve import cli

    repo = tmp_path / "hub" / "models--org--int4"
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    (snapshot / "config.json").write_text(json.dumps(family_configs.vlm_int4_autoround_mtp()))
    monkeypatch.setenv("LNARIZE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LNARIZE_MODEL", "org/int4")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: None)
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "family: vlm-int4-mtp" in out
    assert "LNARIZE_SPECULATIVE_TOKENS=1: int4 AutoRound card" in out
    assert '"quantization": null' in out


def _cascade_on_gb10(monkeypatch, tmp_path):
    """LNARIZE_MODEL: a local text NVFP4-MTP checkpoint folder; the GB10 preset forced."""
    config, hf_quant = family_configs.FAMILIES["text-nvfp4-mtp"]
    folder = tmp_path / "cascade"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    monkeypatch.setenv("LNARIZE_MODEL", str(folder))
    monkeypatch.setenv("LNARIZE_GPU_PROFILE", "gb10")
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: None)


def test_explicit_sampling_and_thinking_defaults_win_over_the_card(monkeypatch):
    monkeypatch.setenv("LNARIZE_SAMPLING_DEFAULTS", '{"temperature": 0.2}')
    monkeypatch.setenv("LNARIZE_THINKING_DEFAULT", "true")
    config, hf_quant = family_configs.FAMILIES["text-nvfp4-mtp"]
    launch = plan_launch(load_settings(), detect_checkpoint(config, hf_quant), GPUS["gb10"])
    assert engine_arg_values(launch.settings, None, launch)["override_generation_config"] == {"temperature": 0.2}
    assert launch.settings.thinking_default is True
    # An explicit empty object keeps the checkpoint's generation_config.json.
    monkeypatch.setenv("LNARIZE_SAMPLING_DEFAULTS", "")
    launch = plan_launch(load_settings(), detect_checkpoint(config, hf_quant), GPUS["gb10"])
    assert "override_generation_config" not in engine_arg_values(launch.settings, None, launch)


def test_the_served_frontend_gets_the_cards_thinking_default(monkeypatch, tmp_path):
    # The runtime installs vLLM's serving classes with the launch's settings,
    # not the ones read from the environment.
    from lnarize_serve.engine import prepare_launch
    from lnarize_serve.serving import frontend_args

    _cascade_on_gb10(monkeypatch, tmp_path)
    settings, engine_args = prepare_launch(load_settings())
    assert engine_args.override_generation_config == CARD_SAMPLING
    assert frontend_args(settings, engine_args).default_chat_template_kwargs == {"enable_thinking": False}


def test_config_shows_the_request_defaults_and_where_they_came_from(monkeypatch, tmp_path, capsys):
    from lnarize_serve import cli

    _cascade_on_gb10(monkeypatch, tmp_path)
    assert cli.main(["config", "--json"]) == 0
    defaults = json.loads(capsys.readouterr().out)["request_defaults"]
    assert defaults["sampling"]["value"] == CARD_SAMPLING
    assert "Cascade NVFP4-MTP GB10 card" in defaults["sampling"]["from"]
    assert defaults["enable_thinking"]["value"] is False
    assert "Cascade NVFP4-MTP GB10 card" in defaults["enable_thinking"]["from"]
    monkeypatch.setenv("LNARIZE_THINKING_DEFAULT", "true")
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "enable_thinking: true (from LNARIZE_THINKING_DEFAULT)" in out
