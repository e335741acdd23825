"""Requests OpenAI refuses that vLLM would serve: refused here with a 400.

The checks run on vLLM's parsed request objects (``ChatCompletionRequest``,
``CompletionRequest``) just before vLLM's serving class sees them, so the
protocol stays vLLM's own and the refusal is an ordinary vLLM ``ErrorResponse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import Request

    from lnarize_serve.vllm_compat.openai import ErrorResponse

# Raw exceptions vLLM's own error mapper treats as the client's fault.
CLIENT_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError)

# OpenAI's chat roles; vLLM would pass any other string into the chat template.
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class Refusal:
    message: str
    param: str


def refusal_for(request: Any, max_n: int) -> Refusal | None:
    """The first reason to refuse ``request`` (a vLLM chat or completion request), or None."""
    n = getattr(request, "n", None)
    if n is not None and n > max_n:
        return Refusal(f"n={n} is above this server's limit of {max_n} choices per request.", "n")
    for index, message in enumerate(getattr(request, "messages", None) or ()):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in CHAT_ROLES:
            return Refusal(
                f"Invalid value {role!r} for messages[{index}].role: expected one of {', '.join(sorted(CHAT_ROLES))}.",
                f"messages[{index}].role",
            )
    for index, tool in enumerate(getattr(request, "tools", None) or ()):
        function = getattr(tool, "function", None)
        parameters = getattr(function, "parameters", None)
        if parameters is None:
            continue
        problem = json_schema_problem(parameters)
        if problem is not None:
            return Refusal(
                f"tools[{index}].function.parameters is not a valid JSON Schema: {problem}",
                f"tools[{index}].function.parameters",
            )
    return None


def json_schema_problem(schema: Any) -> str | None:
    """Why ``schema`` fails its meta-schema (the draft it names, else the latest), or None."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    declared = schema.get("$schema") if isinstance(schema, dict) else None
    if declared is not None and not isinstance(declared, str):
        return f"$schema: {declared!r} is not a string"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        return f"{where.lstrip('.') or '(root)'}: {exc.message}"
    return None


class CheckedServing:
    """Wraps a vLLM serving object (chat or completion): refusals and unknown
    models are answered before it, the server's request defaults vLLM has no
    place for are filled in (request_defaults.py), the rest is its business.

    The model check runs here too because vLLM's chat serving logs an unknown
    model (a client error) at ERROR level; here it is answered silently (the
    access log records the 404).
    """

    def __init__(self, inner: Any, max_n: int, thinking_token_budget: int | None = None) -> None:
        self.inner = inner
        self.max_n = max_n
        self.thinking_token_budget = thinking_token_budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _refuse(self, request: Any) -> ErrorResponse | None:
        refusal = refusal_for(request, self.max_n)
        if refusal is not None:
            return self.inner.create_error_response(refusal.message, param=refusal.param)
        return await self.inner._check_model(request)

    async def create_chat_completion(self, request: Any, raw_request: Request | None = None) -> Any:
        return await self._refuse(request) or await self._answer(self.inner.create_chat_completion, request, raw_request)

    async def create_completion(self, request: Any, raw_request: Request | None = None) -> Any:
        return await self._refuse(request) or await self._answer(self.inner.create_completion, request, raw_request)

    async def _answer(self, serve: Any, request: Any, raw_request: Request | None) -> Any:
        from lnarize_serve.vllm_compat.engine import EngineGenerateError
        from lnarize_serve.vllm_compat.openai import create_error_response

        from lnarize_serve.request_defaults import apply_request_defaults

        apply_request_defaults(request, self.thinking_token_budget)
        try:
            return await serve(request, raw_request)
        except EngineGenerateError as exc:
            # An integer the request models let through (e.g. `top_k` 2**70)
            # that the engine's wire format cannot carry: the request's fault,
            # found before the engine saw it.
            if isinstance(exc.__cause__, OverflowError):
                return create_error_response("Invalid request: an integer in the request is out of range (64 bits at most).")
            raise
        except CLIENT_INPUT_ERRORS as exc:
            # vLLM's request processing (message parsing, rendering) still raises
            # raw exceptions for bad input, e.g. an image for a text-only model;
            # `vllm serve` classifies them with its own mapper, and so do we.
            # Only this call is covered: the same exception from our code is a bug (500).
            response = create_error_response(exc)
            if response.error.code >= 500:
                raise
            if isinstance(exc, TypeError):
                # Its text is Python's ("'bool' object is not iterable"), not a message for a client.
                response.error.message = "Invalid request: a value has the wrong type or shape for this request."
            return response
