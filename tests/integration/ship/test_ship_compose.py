"""docker-compose.yml: its environment, resolved the way compose does, is accepted by the real settings loader."""

from __future__ import annotations

import pytest
from shipfiles import compose_service, container_environment, duration_seconds, load_compose

from lnarize_serve.settings import Settings, env_name, load_settings, unknown_env_vars

SETTING_NAMES = {env_name(name) for name in Settings.model_fields}


@pytest.fixture(scope="module")
def service():
    return compose_service(load_compose())


def settings_for(service, shell: dict[str, str], monkeypatch) -> Settings:
    environment = container_environment(service, shell)
    for key in list(__import__("os").environ):
        if key.upper().startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_every_lnarize_variable_it_names_is_a_setting(service) -> None:
    environment = service["environment"]
    names = [key for key in environment] if isinstance(environment, dict) else [e.partition("=")[0] for e in environment]
    lnarize = [name for name in names if name.startswith("LNARIZE_")]
    assert lnarize and set(lnarize) <= SETTING_NAMES, sorted(set(lnarize) - SETTING_NAMES)
    # Every knob the model card / SERVE.md tells users to set passes through.
    for name in ("LNARIZE_PROFILE", "LNARIZE_MAX_MODEL_LEN", "LNARIZE_MAX_NUM_SEQS", "LNARIZE_GPU_MEM_UTIL", "LNARIZE_API_KEY"):
        assert name in lnarize


def test_every_passthrough_value_reaches_the_loader(service) -> None:
    # A shell that sets every pass-through variable: all of them arrive, nothing unknown.
    shell = {name: "x" for name in SETTING_NAMES}
    environment = container_environment(service, shell)
    assert not unknown_env_vars(environment)


def test_every_setting_reaches_the_container(service) -> None:
    fixed_in_container = {"LNARIZE_HOST": "0.0.0.0", "LNARIZE_PORT": "9000"}
    shell = {name: f"value-of-{name}" for name in SETTING_NAMES}
    environment = container_environment(service, shell)
    assert set(environment) >= SETTING_NAMES, sorted(SETTING_NAMES - set(environment))
    for name in SETTING_NAMES - set(fixed_in_container):
        assert environment[name] == shell[name], name
    assert {name: environment[name] for name in fixed_in_container} == fixed_in_container
    assert container_environment(service, {})["LNARIZE_PROFILE"] == "interactive"


def test_plain_up_serves_the_interactive_profile(service, monkeypatch) -> None:
    settings = settings_for(service, {}, monkeypatch)
    assert (settings.profile, settings.max_model_len, settings.max_num_seqs, settings.gpu_mem_util) == (
        "interactive", 16384, 16, 0.85
    )
    assert settings.quantization == "modelopt_fp4" and settings.speculative_tokens == 3 and not settings.enforce_eager


def test_profile_long_context_from_the_shell(service, monkeypatch) -> None:
    settings = settings_for(service, {"LNARIZE_PROFILE": "long-context"}, monkeypatch)
    assert (settings.max_model_len, settings.max_num_seqs, settings.gpu_mem_util) == (262144, 4, 0.92)
    assert settings.kv_cache_dtype == "fp8"


def test_the_three_explicit_long_context_variables(service, monkeypatch) -> None:
    shell = {"LNARIZE_MAX_MODEL_LEN": "262144", "LNARIZE_MAX_NUM_SEQS": "4", "LNARIZE_KV_CACHE_DTYPE": "fp8"}
    settings = settings_for(service, shell, monkeypatch)
    assert settings.profile == "interactive"
    assert (settings.max_model_len, settings.max_num_seqs, settings.kv_cache_dtype) == (262144, 4, "fp8")


def test_stop_grace_period_exceeds_the_drain_timeout(service, monkeypatch) -> None:
    for shell in ({}, {"LNARIZE_PROFILE": "long-context"}):
        drain = settings_for(service, shell, monkeypatch).drain_timeout
        assert duration_seconds(service["stop_grace_period"]) > drain + 10


def test_gpu_shm_init_ports_and_restart(service) -> None:
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert service["ipc"] == "host" or service.get("shm_size")
    assert service["init"] is True
    assert "9000:9000" in service["ports"]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")


@pytest.mark.vllm  # app_route_paths: the app mounts vLLM's OpenAI routers
def test_healthcheck_targets_readiness_with_a_first_start_sized_start_period(service, app_route_paths) -> None:
    check = service["healthcheck"]
    assert check["test"][:3] == ["CMD", "python3", "-c"]
    assert "http://127.0.0.1:9000/health/ready" in check["test"][3]
    assert "/health/ready" in app_route_paths
    assert duration_seconds(check["start_period"]) >= 40 * 60
    assert duration_seconds(check["start_interval"]) <= 10


def test_hf_token_via_secret_or_environment(service) -> None:
    compose = load_compose()
    assert "hf_token" in service["secrets"]
    assert compose["secrets"]["hf_token"]["file"] == "${HF_TOKEN_FILE:-/dev/null}"
    environment = service["environment"]
    assert "HF_TOKEN" in environment and environment["HF_TOKEN"] is None  # pass-through, never a literal
