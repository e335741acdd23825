"""The project's Qwen3 XML tool-call parser: vLLM's `qwen3_xml` with argument
values fitted to the tool's JSON schema (whitespace the grammar lets through
around a value is dropped where the value fails its schema with it and passes
without it)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lnarize_serve.tool_parsers import fit_to_schema

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 5},
        "note": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "mode": {"const": "fast"},
        "days": {"type": "integer"},
        "stops": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "nested": {"type": "object", "properties": {"unit": {"enum": ["k"]}}},
    },
}


def test_values_that_fail_only_by_their_surrounding_whitespace_lose_it():
    fitted = fit_to_schema(
        {"unit": " celsius\t\r", "mode": "\nfast ", "stops": [" a", "b\n"], "nested": {"unit": " k"},
         "city": " Paris \r"}, SCHEMA
    )
    assert fitted == {"unit": "celsius", "mode": "fast", "stops": ["a", "b"], "nested": {"unit": "k"},
                      "city": "Paris"}
    jsonschema.validate(fitted, SCHEMA)


@pytest.mark.parametrize(
    "arguments",
    [
        {"note": "  New York \n"},  # free text keeps every character
        {"city": " Rom "},  # valid as it is (5 characters)
        {"unit": " kelvin "},  # not an allowed value either way: left for the schema to refuse
        {"unit": "celsius", "days": 3},
        {"other": " x "},  # no schema for it
    ],
)
def test_everything_else_is_unchanged(arguments):
    assert fit_to_schema(arguments, SCHEMA) == arguments


def test_the_parser_fits_a_call_the_grammar_let_whitespace_into(tmp_path):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    from lnarize_serve.vllm_compat.choices import register_project_tool_parsers, tool_call_parsers
    from tests.fixtures.tiny_qwen3_next import write_byte_tokenizer

    register_project_tool_parsers()
    assert "qwen3_xml_schema" in tool_call_parsers()
    write_byte_tokenizer(tmp_path, added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], tools=tools,
                                    tool_choice="required")
    output = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n  Paris \n</parameter>\n"
              "<parameter=unit> celsius\t\r</parameter>\n<parameter=days>\n3\n</parameter>\n"
              "</function>\n</tool_call>")
    fitted = ToolParserManager.get_tool_parser("qwen3_xml_schema")(tokenizer, tools=request.tools)
    (call,) = fitted.extract_tool_calls(output, request).tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius", "days": 3}
    plain = ToolParserManager.get_tool_parser("qwen3_xml")(tokenizer, tools=request.tools)
    (call,) = plain.extract_tool_calls(output, request).tool_calls
    assert json.loads(call.function.arguments)["unit"] == " celsius\t\r"  # what vLLM's own parser keeps
