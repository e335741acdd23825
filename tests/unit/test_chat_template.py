"""LNARIZE_CHAT_TEMPLATE and the shipped qwen3-fixed template, rendered the
way vLLM's HF renderer renders a chat template (transformers' Jinja2 path)."""

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from lnarize_serve.chat_templates import SHIPPED_CHAT_TEMPLATES
from lnarize_serve.engine_args import build_engine_args
from lnarize_serve.serving import frontend_args
from lnarize_serve.settings import ConfigError, load_settings

TEMPLATE = SHIPPED_CHAT_TEMPLATES["qwen3-fixed"].read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
# As vLLM hands messages to the template: tool-call arguments parsed into a dict.
TOOL_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris for 3 days?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sun"}'},
]
CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


def render(messages, **kwargs) -> str:
    rendered, _ = render_jinja_template(
        [messages], tools=[WEATHER], chat_template=TEMPLATE, add_generation_prompt=True, **kwargs
    )
    return rendered[0]


pytestmark = pytest.mark.usefixtures("clean_env")


def test_a_tool_call_and_its_response_survive_with_thinking_off():
    prompt = render(TOOL_TURN, enable_thinking=False)
    assert prompt.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert '"name": "get_weather"' in prompt
    # The assistant turn after the question: its (empty) reasoning block, then the call.
    assert f"<|im_start|>assistant\n<think>\n\n</think>\n\n{CALL}<|im_end|>\n" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"forecast": "sun"}\n</tool_response><|im_end|>\n' in prompt
    # Thinking off: the answer opens with an empty think block.
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_on_by_default_and_earlier_reasoning_dropped():
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "need the tool",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sun"},
        {"role": "tool", "content": "warm"},
    ]
    prompt = render(conversation)
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in prompt
    assert "greet back" not in prompt
    assert (
        "<|im_start|>assistant\n<think>\nneed the tool\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    ) in prompt
    # Consecutive tool results share one user turn.
    assert "<|im_start|>user\n<tool_response>\nsun\n</tool_response>\n<tool_response>\nwarm\n</tool_response><|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


@pytest.mark.vllm
def test_a_shipped_name_or_a_file_reaches_vllms_chat_template_argument(monkeypatch, tmp_path):
    assert frontend_args(load_settings(), build_engine_args(load_settings())).chat_template is None
    monkeypatch.setenv("LNARIZE_CHAT_TEMPLATE", "qwen3-fixed")
    settings = load_settings()
    assert frontend_args(settings, build_engine_args(settings)).chat_template == str(SHIPPED_CHAT_TEMPLATES["qwen3-fixed"])
    own = tmp_path / "mine.jinja"
    own.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    monkeypatch.setenv("LNARIZE_CHAT_TEMPLATE", str(own))
    settings = load_settings()
    assert frontend_args(settings, build_engine_args(settings)).chat_template == str(own)


@pytest.mark.parametrize("value", ["qwen3-fixd", "/nonexistent/template.jinja"])
def test_an_unknown_name_or_missing_file_is_one_configuration_error(monkeypatch, value):
    monkeypatch.setenv("LNARIZE_CHAT_TEMPLATE", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"invalid setting LNARIZE_CHAT_TEMPLATE={value!r}" in message
    assert "neither a shipped chat template (qwen3-fixed) nor a file" in message


@pytest.mark.vllm
def test_the_rendered_call_is_what_the_qwen3_xml_parser_reads_back(tmp_path):
    # The template's pairing: a call it renders into history parses back to
    # the same arguments with vLLM's qwen3_xml parser.
    import json

    from transformers import AutoTokenizer
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    from tests.fixtures.tiny_qwen3_next import write_byte_tokenizer

    write_byte_tokenizer(tmp_path, added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    arguments = {"city": "Paris", "days": 3}
    prompt = render(TOOL_TURN, enable_thinking=False)
    turn = prompt.split("<|im_start|>assistant\n<think>\n\n</think>\n\n")[1].split("<|im_end|>")[0]
    request = ChatCompletionRequest(model="m", messages=TOOL_TURN[:2], tools=[WEATHER])
    parser = ToolParserManager.get_tool_parser("qwen3_xml")(tokenizer, tools=request.tools)
    (call,) = parser.extract_tool_calls(turn, request).tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == arguments


def test_config_shows_the_chat_template_and_its_origin(monkeypatch, capsys):
    from lnarize_serve import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("lnarize_serve.gpu.probe_gpu", lambda: None)
    assert cli.main(["config"]) == 0
    assert "chat_template: the model's own (from default)" in capsys.readouterr().out
    monkeypatch.setenv("LNARIZE_CHAT_TEMPLATE", "qwen3-fixed")
    assert cli.main(["config"]) == 0
    assert "chat_template: qwen3-fixed (from LNARIZE_CHAT_TEMPLATE)" in capsys.readouterr().out
