"""Allowed values that vLLM itself defines, looked up lazily (importing vLLM is
slow): importing this module imports no vLLM, so settings can use it in their
vLLM-free first pass."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import logging.handlers
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache
from typing import get_args

_lookups_enabled: ContextVar[bool] = ContextVar("vllm_lookups_enabled", default=True)


def lookups_enabled() -> bool:
    """False inside ``without_lookups()``: validators then accept any value."""
    return _lookups_enabled.get()


@contextlib.contextmanager
def without_lookups() -> Iterator[None]:
    """Validate everything that needs no vLLM import (importing it logs Triton
    and platform lines, which must not precede a configuration error)."""
    token = _lookups_enabled.set(False)
    try:
        yield
    finally:
        _lookups_enabled.reset(token)


@contextlib.contextmanager
def held_back_vllm_logs() -> Iterator[None]:
    """vLLM's log records (Triton and platform lines logged when its modules are
    first imported) are held back until the block ends: emitted if it succeeds,
    dropped if it raises, so a configuration error is printed alone."""
    import vllm.logger  # noqa: F401 - sets up vLLM's handlers (logs nothing)

    vllm_logger = logging.getLogger("vllm")
    handlers, propagate = vllm_logger.handlers[:], vllm_logger.propagate
    held = logging.handlers.BufferingHandler(capacity=100_000)
    vllm_logger.handlers, vllm_logger.propagate = [held], False
    try:
        yield
    finally:
        vllm_logger.handlers, vllm_logger.propagate = handlers, propagate
    for record in held.buffer:
        vllm_logger.callHandlers(record)


@cache
def quantization_methods() -> tuple[str, ...]:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return tuple(QUANTIZATION_METHODS)


@cache
def kv_cache_dtypes() -> tuple[str, ...]:
    from vllm.config.cache import CacheDType

    return tuple(get_args(CacheDType))


@cache
def engine_arg_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_"))


# The project's own tool-call parsers: name -> (module, class), registered
# with vLLM lazily (imported only when a server selects one).
PROJECT_TOOL_PARSERS = {"qwen3_xml_schema": ("lnarize_serve.tool_parsers", "Qwen3XmlSchemaToolParser")}


def register_project_tool_parsers() -> None:
    from vllm.tool_parsers import ToolParserManager

    for name, (module, class_name) in PROJECT_TOOL_PARSERS.items():
        ToolParserManager.register_lazy_module(name, module, class_name)


@cache
def tool_call_parsers() -> tuple[str, ...]:
    from vllm.tool_parsers import ToolParserManager

    register_project_tool_parsers()
    return tuple(ToolParserManager.list_registered())


@cache
def reasoning_parsers() -> tuple[str, ...]:
    from vllm.reasoning import ReasoningParserManager

    return tuple(ReasoningParserManager.list_registered())
