"""`bench compare`'s plain-vLLM command: lnarize-serve's engine arguments turned into
vLLM API server flags, parsed back by vLLM's real parser (imports vLLM: not a unit test)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def vllm_parser():
    from lnarize_serve.vllm_compat.openai import serve_arg_parser

    return serve_arg_parser()


def test_cpu_demo_engine_arguments_reach_plain_vllm_unchanged(vllm_parser, monkeypatch):
    from lnarize_serve.bench.servers import check_flags, vllm_flags
    from lnarize_serve.engine_args import engine_arg_values
    from lnarize_serve.settings import Settings

    for key in list(os.environ):
        if key.startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    settings = Settings(profile="cpu-demo", max_num_seqs=16, dtype="float32")
    values = engine_arg_values(settings, "/models/smollm2")
    values.update({"tool_call_parser": "qwen3_xml", "enable_auto_tool_choice": True})
    model = values.pop("model")
    flags = ["--model", model, *vllm_flags(values, vllm_parser)]
    assert "--enforce-eager" in flags and "--enable-prefix-caching" in flags
    assert flags[flags.index("--max-num-seqs") + 1] == "16"
    check_flags(flags, {**values, "model": model}, vllm_parser)  # raises on any mismatch


def test_production_shape_with_mtp_and_cuda_graphs_maps_too(vllm_parser, monkeypatch):
    from lnarize_serve.bench.servers import check_flags, vllm_flags
    from lnarize_serve.engine_args import engine_arg_values
    from lnarize_serve.settings import Settings

    for key in list(os.environ):
        if key.startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    values = engine_arg_values(Settings(profile="interactive"))
    model = values.pop("model")
    flags = ["--model", model, *vllm_flags(values, vllm_parser)]
    assert "--no-enforce-eager" in flags or "--enforce-eager" not in flags
    check_flags(flags, {**values, "model": model}, vllm_parser)


def test_a_flag_that_parses_differently_is_refused(vllm_parser):
    from lnarize_serve.bench.servers import ServerStartError, check_flags

    with pytest.raises(ServerStartError, match="max_num_seqs"):
        check_flags(["--model", "m", "--max-num-seqs", "8"], {"model": "m", "max_num_seqs": 16}, vllm_parser)


def test_plain_vllm_gets_the_projects_tool_parser_as_a_plugin(vllm_parser):
    """Plain `vllm serve` knows qwen3_xml_schema only through --tool-parser-plugin;
    vLLM's own plugin loader must register it from the module file."""
    import importlib.util

    from vllm.tool_parsers import ToolParserManager

    from lnarize_serve.bench.servers import check_flags, vllm_flags
    from lnarize_serve.vllm_compat.choices import PROJECT_TOOL_PARSERS

    module, class_name = PROJECT_TOOL_PARSERS["qwen3_xml_schema"]
    plugin = importlib.util.find_spec(module).origin
    values = {"tool_call_parser": "qwen3_xml_schema", "tool_parser_plugin": plugin, "enable_auto_tool_choice": True}
    flags = vllm_flags(values, vllm_parser)
    assert flags[flags.index("--tool-parser-plugin") + 1] == plugin
    check_flags(flags, values, vllm_parser)
    ToolParserManager.tool_parsers.pop("qwen3_xml_schema", None)
    ToolParserManager.lazy_parsers.pop("qwen3_xml_schema", None)
    ToolParserManager.import_tool_parser(plugin)
    assert ToolParserManager.get_tool_parser("qwen3_xml_schema").__name__ == class_name
