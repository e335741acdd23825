"""Refusals of requests OpenAI refuses, on vLLM's own parsed request objects."""

from types import SimpleNamespace

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from lnarize_serve.request_checks import CHAT_ROLES, json_schema_problem, refusal_for

USER = {"role": "user", "content": "hi"}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", **{"messages": [USER], **fields})


def tool(parameters) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}


def test_a_plain_request_passes():
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert refusal_for(chat(n=128, tools=[tool(weather)]), max_n=128) is None


@pytest.mark.parametrize("role", sorted(CHAT_ROLES))
def test_openai_roles_pass(role):
    assert refusal_for(chat(messages=[{"role": role, "content": "x"}]), max_n=1) is None


def test_unknown_role_is_refused_naming_the_message():
    refusal = refusal_for(chat(messages=[USER, {"role": "wizard", "content": "abracadabra"}]), max_n=128)
    assert refusal is not None
    assert refusal.param == "messages[1].role"
    assert "'wizard'" in refusal.message


def test_n_above_the_limit_is_refused_for_chat_and_completions():
    assert refusal_for(chat(n=129), max_n=128).param == "n"
    assert refusal_for(CompletionRequest(model="m", prompt="hi", n=5), max_n=4).param == "n"
    assert refusal_for(CompletionRequest(model="m", prompt="hi", n=4), max_n=4) is None


@pytest.mark.parametrize(
    ("parameters", "where"),
    [
        ({"type": "nonsense"}, "type"),
        ({"properties": 5}, "properties"),
        ({"type": "object", "properties": {"city": {"type": "strin"}}}, "properties.city.type"),
        ({"type": "object", "required": "city"}, "required"),
        ({"$schema": ["not", "a", "uri"]}, "$schema"),
    ],
)
def test_invalid_tool_schema_is_refused_naming_the_tool(parameters, where):
    refusal = refusal_for(chat(tools=[tool({"type": "object"}), tool(parameters)]), max_n=128)
    assert refusal is not None
    assert refusal.param == "tools[1].function.parameters"
    assert f"{where}:" in refusal.message


def test_tool_without_parameters_passes():
    assert refusal_for(chat(tools=[{"type": "function", "function": {"name": "now"}}]), max_n=1) is None


def test_schema_problem_names_nothing_for_valid_schemas():
    assert json_schema_problem({}) is None
    assert json_schema_problem({"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer"}) is None
    assert json_schema_problem({"$schema": "http://json-schema.org/draft-07/schema#", "type": "nonsense"}) is not None


class _RaisingServing:
    """Stands in for vLLM's chat serving object, whose request processing
    raises these for bad input (the real path: tests/e2e/test_demo_server.py,
    an image sent to the text-only demo model)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def _check_model(self, request):
        return None

    async def create_chat_completion(self, request, raw_request=None):
        raise self.exc


def _chat(exc: Exception):
    import asyncio

    from lnarize_serve.request_checks import CheckedServing

    request = SimpleNamespace(n=1, messages=[{"role": "user", "content": "hi"}], tools=None)
    return asyncio.run(CheckedServing(_RaisingServing(exc), max_n=128).create_chat_completion(request))


def test_bad_input_raised_by_vllms_processing_is_a_400_with_its_message():
    response = _chat(ValueError("smollm2 is not a multimodal model"))
    assert response.error.code == 400 and response.error.type == "BadRequestError"
    assert "not a multimodal model" in response.error.message


def test_an_integer_the_engine_cannot_carry_is_a_400():
    from vllm.v1.engine.exceptions import EngineGenerateError

    try:
        raise EngineGenerateError() from OverflowError("can't serialize ints < -2**63 or > 2**64 - 1")
    except EngineGenerateError as exc:
        response = _chat(exc)
    assert response.error.code == 400 and "out of range" in response.error.message


def test_other_exceptions_from_vllm_are_not_turned_into_client_errors():
    from vllm.v1.engine.exceptions import EngineDeadError

    for exc in (RuntimeError("bug"), EngineDeadError()):
        with pytest.raises(type(exc)):
            _chat(exc)
