"""vLLM's own OpenAI serving stack mounted in our app (no hand-written protocol).

Routes come from vLLM's routers; they look their handler objects up on
``app.state`` per request, so they are registered at app creation and the
handlers are installed once the engine exists (``install_openai_serving``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fastapi import FastAPI

from lnarize_serve.settings import Settings

if TYPE_CHECKING:
    from starlette.datastructures import State

    from lnarize_serve.vllm_compat.async_engine import AsyncLLM
    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def mount_openai_routes(app: FastAPI) -> None:
    from lnarize_serve.vllm_compat.openai import openai_routers

    for router in openai_routers():
        for route in router.routes:
            # Only the three public endpoints (vLLM's chat router also carries
            # an experimental batch route).
            if getattr(route, "path", None) in OPENAI_ROUTES:
                app.router.routes.append(route)


def frontend_args(settings: Settings, engine_args: AsyncEngineArgs) -> argparse.Namespace:
    """The argparse namespace vLLM's serving classes read, as `vllm serve` would build it.

    Starts from vLLM's own parser defaults (so every frontend option exists),
    then mirrors our engine arguments and frontend settings into it.
    """
    import dataclasses

    from lnarize_serve.vllm_compat.choices import register_project_tool_parsers
    from lnarize_serve.vllm_compat.openai import serve_arg_parser, validate_parsed_serve_args

    register_project_tool_parsers()
    namespace = serve_arg_parser().parse_args([])
    # Folds reasoning_parser into structured_outputs_config, where the serving
    # classes read it (idempotent; vLLM does the same when building the engine).
    engine_args.create_structured_outputs_config()
    for field in dataclasses.fields(engine_args):
        if not field.name.startswith("_"):
            setattr(namespace, field.name, getattr(engine_args, field.name))
    namespace.served_model_name = [settings.effective_served_model_name]
    namespace.tool_call_parser = settings.tool_call_parser
    namespace.enable_auto_tool_choice = settings.enable_auto_tool_choice
    # vLLM's default ("auto") pins only the tool-call envelope unless a tool
    # says `strict: true`, so a forced call could carry arguments that do not
    # match the tool's schema; "parameter" constrains them to the schema.
    namespace.tool_strict_level = "parameter"
    namespace.enable_log_requests = False
    namespace.disable_log_stats = False
    namespace.log_error_stack = settings.log_level == "debug"
    # Usage in every final streaming chunk only when the client asks for it
    # (stream_options.include_usage), as in OpenAI's API.
    namespace.enable_force_include_usage = False
    if settings.chat_template is not None:
        from lnarize_serve.chat_templates import chat_template_path

        # As `vllm serve --chat-template PATH`: vLLM's serving classes load the file.
        namespace.chat_template = str(chat_template_path(settings.chat_template))
    if settings.thinking_default is not None:
        # Defaults under a request's own chat_template_kwargs (vLLM merges them).
        namespace.default_chat_template_kwargs = {"enable_thinking": settings.thinking_default}
    validate_parsed_serve_args(namespace)
    return namespace


async def install_openai_serving(
    state: State, engine: AsyncLLM, settings: Settings, engine_args: AsyncEngineArgs
) -> None:
    from lnarize_serve.request_checks import CheckedServing
    from lnarize_serve.request_defaults import thinking_budget_problem
    from lnarize_serve.settings import ConfigError
    from lnarize_serve.vllm_compat.openai import init_app_state

    problem = thinking_budget_problem(settings, engine.vllm_config.reasoning_config)
    if problem:
        raise ConfigError(problem)
    namespace = frontend_args(settings, engine_args)
    supported_tasks = await engine.get_supported_tasks()
    await init_app_state(engine, state, namespace, supported_tasks)
    # vLLM's routes look these up per request: each request passes our checks first.
    for name in ("openai_serving_chat", "openai_serving_completion"):
        handler = getattr(state, name, None)
        if handler is not None:
            setattr(state, name, CheckedServing(handler, settings.max_n, settings.thinking_token_budget))
