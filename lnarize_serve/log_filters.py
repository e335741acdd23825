"""Keeps expected engine-death errors to one log line each.

When the engine process goes away (it died, or the server shuts it down), vLLM
logs a full EngineDeadError traceback from its output handler and from every
open stream's generator. The traceback says nothing the runtime's own line
("vLLM engine died ...") does not, so these records keep their message only;
when the server itself shut the engine down, they are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

# The vLLM loggers that log EngineDeadError with a traceback.
ENGINE_DEAD_LOGGERS = (
    "vllm.v1.engine.async_llm",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.completion.serving",
)


def is_engine_dead_error(exc: BaseException | None) -> bool:
    from lnarize_serve.vllm_compat.engine import EngineDeadError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, EngineDeadError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class EngineDeadTracebackFilter(logging.Filter):
    def __init__(self, shutdown_expected: Callable[[], bool] = lambda: False) -> None:
        super().__init__()
        self.shutdown_expected = shutdown_expected

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_engine_dead_error(exc):
            if self.shutdown_expected():
                return False
            record.msg = f"{record.msg} (EngineDeadError: the engine process is gone)"
            record.exc_info = None
            record.exc_text = None
        return True


def install_engine_dead_filter(shutdown_expected: Callable[[], bool]) -> None:
    """``shutdown_expected``: true once the server is shutting the engine down itself."""
    for name in ENGINE_DEAD_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, EngineDeadTracebackFilter)]:
            logger.removeFilter(old)
        logger.addFilter(EngineDeadTracebackFilter(shutdown_expected))
