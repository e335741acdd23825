"""Settings -> vLLM AsyncEngineArgs, per profile."""

import dataclasses

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from lnarize_serve.engine import check_kvtc_supported
from lnarize_serve.engine_args import build_engine_args
from lnarize_serve.settings import DEFAULT_MODEL, ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


def test_production_interactive_is_nvfp4_mtp3_cudagraphs():
    args = build_engine_args(load_settings())
    assert isinstance(args, AsyncEngineArgs)
    assert args.model == DEFAULT_MODEL
    assert args.quantization == "modelopt_fp4"
    assert args.speculative_config == {"method": "mtp", "num_speculative_tokens": 3}
    assert args.enforce_eager is False  # CUDA graphs on
    assert (args.max_model_len, args.max_num_seqs, args.gpu_memory_utilization) == (16384, 16, 0.85)
    assert args.language_model_only is True
    assert args.reasoning_parser == "qwen3"
    assert args.enable_prefix_caching is True
    assert args.served_model_name == [DEFAULT_MODEL]
    assert args.disable_log_stats is False


def test_long_context_profile(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    args = build_engine_args(load_settings())
    assert (args.max_model_len, args.max_num_seqs, args.gpu_memory_utilization) == (262144, 4, 0.92)
    assert args.quantization == "modelopt_fp4"
    assert args.speculative_config == {"method": "mtp", "num_speculative_tokens": 3}
    assert args.enforce_eager is False


def test_cpu_demo_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    monkeypatch.setenv("LNARIZE_CACHE_DIR", str(tmp_path))
    args = build_engine_args(load_settings(), model_location="/models/smollm2")
    assert args.model == "/models/smollm2"
    assert args.served_model_name == ["smollm2-135m-instruct"]
    assert args.enforce_eager is True
    assert args.speculative_config is None
    assert args.quantization is None  # read from the checkpoint (none: bf16 weights)
    assert args.reasoning_parser == ""
    assert args.download_dir == str(tmp_path / "hub")


def test_speculative_zero_disables(monkeypatch):
    monkeypatch.setenv("LNARIZE_SPECULATIVE_TOKENS", "0")
    assert build_engine_args(load_settings()).speculative_config is None


def test_escape_hatch_reaches_engine_args(monkeypatch):
    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", '{"max_num_batched_tokens": 2048, "seed": 11}')
    args = build_engine_args(load_settings())
    assert (args.max_num_batched_tokens, args.seed) == (2048, 11)


def test_every_generated_key_is_an_engine_arg():
    names = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    from lnarize_serve.engine_args import engine_arg_values

    assert set(engine_arg_values(load_settings())) <= names


def test_kvtc_settings_this_build_cannot_honour_are_refused(monkeypatch):
    monkeypatch.setenv("LNARIZE_KVTC_ENABLE", "true")
    check_kvtc_supported(load_settings())
    monkeypatch.setenv("LNARIZE_KVTC_SINK_TOKENS", "4")
    monkeypatch.setenv("LNARIZE_KV_CACHE_DTYPE", "fp8")
    with pytest.raises(ConfigError) as info:
        check_kvtc_supported(load_settings())
    assert "LNARIZE_KVTC_SINK_TOKENS=4" in str(info.value)
    assert "LNARIZE_KV_CACHE_DTYPE='fp8'" in str(info.value)


def test_kvtc_engine_args_select_the_custom_backend(monkeypatch):
    from lnarize_serve.engine_args import engine_arg_values

    monkeypatch.setenv("LNARIZE_KVTC_ENABLE", "true")
    values = engine_arg_values(load_settings())
    assert values["attention_backend"] == "CUSTOM"
    # the KVTC settings join them only once resolved (install_kvtc; `config` shows them)
    assert "lnarize_kvtc" not in (values.get("additional_config") or {})
