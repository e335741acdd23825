"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

vLLM's serving classes already answer bad requests in this shape (type
``BadRequestError``, ``NotFoundError``, ...; ``code`` is the HTTP status). The
handlers here make the rest of the app speak the same dialect: request
validation is 400 (FastAPI would say 422), framework errors keep their status,
and anything unexpected is a generic 500 whose details go to the log only.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("lnarize_serve.errors")

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
GENERIC_500_MESSAGE = "The server hit an internal error; the request id is in the server log as error_id={error_id}."


def error_type_for(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type_for(status), "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def internal_error_response(exc: BaseException | None = None, detail: str = "") -> JSONResponse:
    """Log the real cause under a fresh id; tell the client only the id."""
    error_id = uuid.uuid4().hex[:12]
    if exc is not None:
        logger.error("internal error error_id=%s: %r", error_id, exc, exc_info=exc)
    else:
        logger.error("internal error error_id=%s: %s", error_id, detail)
    return error_response(500, GENERIC_500_MESSAGE.format(error_id=error_id))


def _location(loc: Any) -> str | None:
    if not isinstance(loc, list | tuple) or not loc:
        return None
    # Drop pydantic's internal union/wrapper markers such as "function-wrap[...]".
    parts = [str(p) for p in loc if not any(c in str(p) for c in "[](){}")]
    return ".".join(parts) or None


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A readable one-paragraph message and the first offending parameter."""
    lines: list[str] = []
    first_param: str | None = None
    for error in errors[:5]:
        if not isinstance(error, dict):
            lines.append(str(error))
            continue
        if error.get("type") == "json_invalid":
            lines.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = _location(error.get("loc"))
        if first_param is None and where:
            first_param = where.removeprefix("body.")
        lines.append(f"{where}: {error.get('msg', 'invalid value')}" if where else str(error.get("msg")))
    if len(errors) > 5:
        lines.append(f"... and {len(errors) - 5} more")
    return "; ".join(lines) or "invalid request", first_param


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(exc.errors()))
    return error_response(400, f"Invalid request: {message}", param)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = 400 if exc.status_code == 422 else exc.status_code
    if status >= 500:
        return internal_error_response(detail=str(exc.detail))
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(status, message, headers=getattr(exc, "headers", None))


async def _on_vllm_client_error(request: Request, exc: Exception) -> JSONResponse:
    # vLLM's request-validation errors (VLLMClientError: validation, not found,
    # ...) that escape its serving classes; its mapper picks the 4xx status.
    from lnarize_serve.vllm_compat.openai import create_error_response

    info = create_error_response(exc).error
    status = 400 if info.code == 422 else int(info.code)
    if status >= 500:
        return internal_error_response(exc)
    return error_response(status, info.message, info.param)


ENGINE_DEAD_MESSAGE = "The inference engine has died; the server is restarting."


async def _on_engine_dead(request: Request, exc: Exception) -> JSONResponse:
    # Not a bug of this request: the watchdog is already taking the process
    # down (exit 3). One line, no traceback; the client may retry elsewhere.
    logger.warning("%s %s: engine dead, answered 503", request.method, request.url.path)
    from lnarize_serve.health import RETRY_AFTER_SECONDS

    return error_response(503, ENGINE_DEAD_MESSAGE, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


BODY_SHAPE_MESSAGE = "Invalid request: a field of the body has a value of the wrong type or shape."


def raised_while_reading_the_body(exc: BaseException) -> bool:
    """Whether ``exc`` came out of FastAPI's body parsing (a pydantic validator
    of vLLM's request models that assumed a type the body did not have, e.g.
    iterating ``"messages": false``), not out of an endpoint."""
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.replace("\\", "/").endswith("fastapi/dependencies/utils.py"):
            return True
        frame = frame.tb_next
    return False


def unexpected_error_response(exc: BaseException, method: str, path: str) -> JSONResponse:
    """An exception nothing else handled: a 400 if the body's parsing raised
    it, else a bug of ours (generic 500 with an error id). Body parsing runs only
    the request models' validators over the body, so whatever they raise
    (TypeError, AttributeError, ...) is the body's shape, never server state."""
    if raised_while_reading_the_body(exc):
        logger.info("%s %s: body refused (%s in request parsing)", method, path, type(exc).__name__)
        return error_response(400, BODY_SHAPE_MESSAGE)
    return internal_error_response(exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error_response(exc, request.method, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Only request validation is a client error. A ValueError or TypeError
    raised by server code is a bug: generic 500 with an error id (vLLM's serving
    classes turn the ValueErrors of their own input checks into 400 responses
    before they get here)."""
    from lnarize_serve.vllm_compat.engine import EngineDeadError
    from lnarize_serve.vllm_compat.openai import VLLMClientError

    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(EngineDeadError, _on_engine_dead)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(VLLMClientError, _on_vllm_client_error)
    app.add_exception_handler(Exception, _on_unexpected)
