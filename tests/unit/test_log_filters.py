"""Engine-death records from vLLM keep one line (none when the server shut the
engine down itself); other tracebacks stay."""

import logging

from vllm.v1.engine.exceptions import EngineDeadError

from lnarize_serve.log_filters import EngineDeadTracebackFilter


def record_for(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException as raised:
        import sys

        assert raised is exc
        return logging.LogRecord("vllm.v1.engine.async_llm", logging.ERROR, __file__, 1,
                                 "AsyncLLM output_handler failed.", (), sys.exc_info())


def test_engine_dead_error_loses_its_traceback():
    record = record_for(EngineDeadError())
    assert EngineDeadTracebackFilter().filter(record)
    assert record.exc_info is None
    text = logging.Formatter().format(record)
    assert "Traceback" not in text and "\n" not in text
    assert text == "AsyncLLM output_handler failed. (EngineDeadError: the engine process is gone)"


def test_engine_dead_error_as_a_cause_is_recognised():
    try:
        try:
            raise EngineDeadError()
        except EngineDeadError as dead:
            raise RuntimeError("wrapped") from dead
    except RuntimeError as wrapped:
        record = record_for(wrapped)
    assert EngineDeadTracebackFilter().filter(record)
    assert record.exc_info is None


def test_other_errors_keep_their_traceback():
    record = record_for(ValueError("boom"))
    assert EngineDeadTracebackFilter().filter(record)
    assert "Traceback" in logging.Formatter().format(record)


def test_engine_dead_error_during_our_own_shutdown_is_dropped():
    record = record_for(EngineDeadError())
    assert not EngineDeadTracebackFilter(shutdown_expected=lambda: True).filter(record)
