"""Server-wide thinking_token_budget default: the setting, vLLM's reasoning
config it relies on, and that a request's own value wins."""

import asyncio
from types import SimpleNamespace

import pytest
from vllm.config.reasoning import ReasoningConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from lnarize_serve.engine_args import build_engine_args
from lnarize_serve.request_defaults import apply_request_defaults, thinking_budget_problem
from lnarize_serve.settings import ConfigError, load_settings

USER = [{"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("clean_env")


def test_unset_by_default_and_typed(monkeypatch):
    assert load_settings().thinking_token_budget is None
    monkeypatch.setenv("LNARIZE_THINKING_TOKEN_BUDGET", "4096")
    assert load_settings().thinking_token_budget == 4096
    monkeypatch.setenv("LNARIZE_THINKING_TOKEN_BUDGET", "-5")
    with pytest.raises(ConfigError, match="LNARIZE_THINKING_TOKEN_BUDGET='-5'"):
        load_settings()


def test_a_budget_without_a_reasoning_parser_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("LNARIZE_THINKING_TOKEN_BUDGET", "1024")
    monkeypatch.setenv("LNARIZE_REASONING_PARSER", "none")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "LNARIZE_THINKING_TOKEN_BUDGET=1024 needs LNARIZE_REASONING_PARSER" in message
    assert len(message.splitlines()) == 1
    # The cpu-demo preset has no reasoning parser either.
    monkeypatch.delenv("LNARIZE_REASONING_PARSER")
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    with pytest.raises(ConfigError, match="needs LNARIZE_REASONING_PARSER"):
        load_settings()


def test_vllm_builds_the_reasoning_config_the_budget_needs_from_the_parser(monkeypatch):
    # vLLM counts a budget only with a reasoning config; it derives one from
    # the reasoning parser when it builds the engine config (this step of it).
    monkeypatch.setenv("LNARIZE_THINKING_TOKEN_BUDGET", "1024")
    args = build_engine_args(load_settings())
    args._set_default_reasoning_config_args()
    assert isinstance(args.reasoning_config, ReasoningConfig)
    assert args.reasoning_config.reasoning_parser == "qwen3"


def test_the_default_fills_only_requests_that_leave_it_out():
    unset = ChatCompletionRequest(model="m", messages=USER)
    apply_request_defaults(unset, thinking_token_budget=512)
    assert unset.to_sampling_params(16, {}).thinking_token_budget == 512
    own = ChatCompletionRequest(model="m", messages=USER, thinking_token_budget=64)
    apply_request_defaults(own, thinking_token_budget=512)
    assert own.to_sampling_params(16, {}).thinking_token_budget == 64
    # -1 is vLLM's "unlimited" (it parses to None): the request's choice stands.
    unlimited = ChatCompletionRequest(model="m", messages=USER, thinking_token_budget=-1)
    apply_request_defaults(unlimited, thinking_token_budget=512)
    assert unlimited.to_sampling_params(16, {}).thinking_token_budget is None
    completion = CompletionRequest(model="m", prompt="hi")
    apply_request_defaults(completion, thinking_token_budget=512)
    assert completion.thinking_token_budget == 512
    no_default = ChatCompletionRequest(model="m", messages=USER)
    apply_request_defaults(no_default, thinking_token_budget=None)
    assert no_default.to_sampling_params(16, {}).thinking_token_budget is None


class _RecordingServing:
    """Stands in for vLLM's serving object to see the request it is handed
    (the real one needs a built engine)."""

    def __init__(self) -> None:
        self.seen = []

    async def _check_model(self, request):
        return None

    async def create_chat_completion(self, request, raw_request=None):
        self.seen.append(request)
        return "answered"

    create_completion = create_chat_completion


def test_the_served_endpoints_apply_the_default():
    from lnarize_serve.request_checks import CheckedServing

    inner = _RecordingServing()
    serving = CheckedServing(inner, max_n=128, thinking_token_budget=256)
    asyncio.run(serving.create_chat_completion(ChatCompletionRequest(model="m", messages=USER)))
    asyncio.run(serving.create_completion(CompletionRequest(model="m", prompt="hi")))
    assert [request.thinking_token_budget for request in inner.seen] == [256, 256]


def test_a_reasoning_config_vllm_could_not_initialize_stops_the_start():
    settings = SimpleNamespace(thinking_token_budget=1024, reasoning_parser="qwen3")
    problem = thinking_budget_problem(settings, ReasoningConfig(reasoning_parser="qwen3"))
    assert problem is not None and "LNARIZE_THINKING_TOKEN_BUDGET" in problem and "qwen3" in problem
    assert thinking_budget_problem(settings, None) is not None
    initialized = ReasoningConfig(reasoning_parser="qwen3")
    # What initialize_token_ids finds once the tokenizer gave the markers' ids.
    initialized._reasoning_start_token_ids = [1]
    initialized._reasoning_end_token_ids = initialized._natural_reasoning_end_token_ids = [2]
    initialized.initialize_token_ids(None)
    assert thinking_budget_problem(settings, initialized) is None
    assert thinking_budget_problem(SimpleNamespace(thinking_token_budget=None, reasoning_parser="qwen3"), None) is None


def test_config_shows_the_budget_and_its_origin(monkeypatch, capsys):
    from lnarize_serve import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: None)
    monkeypatch.setenv("LNARIZE_THINKING_TOKEN_BUDGET", "2048")
    assert cli.main(["config"]) == 0
    assert "thinking_token_budget: 2048 (from LNARIZE_THINKING_TOKEN_BUDGET)" in capsys.readouterr().out
