"""Server-wide sampling and thinking defaults: where they go in vLLM, and that a request's own values win."""

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from lnarize_serve.engine_args import build_engine_args, engine_arg_values
from lnarize_serve.serving import frontend_args
from lnarize_serve.settings import ConfigError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


CARD = '{"temperature": 0.7, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}'


def test_sampling_defaults_become_vllms_generation_config_override(monkeypatch):
    assert "override_generation_config" not in engine_arg_values(load_settings())
    monkeypatch.setenv("LNARIZE_SAMPLING_DEFAULTS", CARD)
    args = build_engine_args(load_settings())
    assert args.override_generation_config == {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}


def test_unknown_sampling_key_and_bad_json_name_the_variable(monkeypatch):
    monkeypatch.setenv("LNARIZE_SAMPLING_DEFAULTS", '{"temprature": 0.7}')
    with pytest.raises(ConfigError, match=r"LNARIZE_SAMPLING_DEFAULTS.*unknown sampling parameter\(s\): temprature"):
        load_settings()
    monkeypatch.setenv("LNARIZE_SAMPLING_DEFAULTS", "{temperature")
    with pytest.raises(ConfigError, match="LNARIZE_SAMPLING_DEFAULTS.*not valid JSON"):
        load_settings()


def test_the_escape_hatch_cannot_set_them_behind_the_setting(monkeypatch):
    monkeypatch.setenv("LNARIZE_ENGINE_ARGS", '{"override_generation_config": {"temperature": 0}}')
    with pytest.raises(ConfigError, match="use LNARIZE_SAMPLING_DEFAULTS"):
        load_settings()


def test_a_requests_own_values_win_over_the_defaults():
    # vLLM's own merge (the defaults it derives from override_generation_config).
    defaults = {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}
    messages = [{"role": "user", "content": "hi"}]
    own = ChatCompletionRequest(model="m", messages=messages, temperature=0.3, top_k=5).to_sampling_params(16, defaults)
    assert (own.temperature, own.top_k, own.top_p, own.repetition_penalty) == (0.3, 5, 0.95, 1.1)
    unset = ChatCompletionRequest(model="m", messages=messages).to_sampling_params(16, defaults)
    assert (unset.temperature, unset.top_k) == (0.7, 20)


def test_thinking_default_reaches_vllms_chat_template_defaults(monkeypatch):
    assert frontend_args(load_settings(), build_engine_args(load_settings())).default_chat_template_kwargs is None
    monkeypatch.setenv("LNARIZE_THINKING_DEFAULT", "false")
    settings = load_settings()
    namespace = frontend_args(settings, build_engine_args(settings))
    assert namespace.default_chat_template_kwargs == {"enable_thinking": False}
