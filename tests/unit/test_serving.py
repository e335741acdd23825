"""Mounting vLLM's OpenAI serving: the routes, and the frontend namespace its classes read."""

import pytest
from fastapi import FastAPI

from lnarize_serve.engine_args import build_engine_args
from lnarize_serve.serving import OPENAI_ROUTES, frontend_args, mount_openai_routes
from lnarize_serve.settings import load_settings

pytestmark = pytest.mark.usefixtures("clean_env")


def test_exactly_the_three_public_routes_are_mounted():
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    mount_openai_routes(app)
    mounted = sorted((route.path, tuple(sorted(route.methods))) for route in app.routes)
    assert mounted == [
        ("/v1/chat/completions", ("POST",)),
        ("/v1/completions", ("POST",)),
        ("/v1/models", ("GET",)),
    ]
    assert set(OPENAI_ROUTES) == {path for path, _ in mounted}


def test_frontend_namespace_carries_parsers_and_served_name():
    settings = load_settings()
    namespace = frontend_args(settings, build_engine_args(settings))
    assert namespace.served_model_name == ["sakamakismile/Qwen3.6-27B-LNARIZE-NVFP4"]
    assert namespace.tool_call_parser == "qwen3_xml_schema"
    assert namespace.enable_auto_tool_choice is True
    # Forced tool calls are constrained to each tool's schema, not only to the call envelope.
    assert namespace.tool_strict_level == "parameter"
    assert namespace.structured_outputs_config.reasoning_parser == "qwen3"
    assert namespace.speculative_config == {"method": "mtp", "num_speculative_tokens": 3}
    assert namespace.enable_force_include_usage is False
    assert namespace.disable_log_stats is False


def test_frontend_namespace_without_parsers(monkeypatch):
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")
    monkeypatch.setenv("LNARIZE_TOOL_CALL_PARSER", "none")
    monkeypatch.setenv("LNARIZE_ENABLE_AUTO_TOOL_CHOICE", "false")
    settings = load_settings()
    namespace = frontend_args(settings, build_engine_args(settings, "/models/demo"))
    assert namespace.tool_call_parser is None
    assert namespace.structured_outputs_config.reasoning_parser == ""
    assert namespace.served_model_name == ["smollm2-135m-instruct"]
    assert namespace.model == "/models/demo"
