"""Pure ASGI middleware (streaming-safe, disconnects pass straight through).

Order, outermost first (see app.create_app): access log -> request accounting
-> internal error shield -> API key -> body size limit -> admission (readiness
+ in-flight) -> response cut (drain timeout, dead engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lnarize_serve.errors import ENGINE_DEAD_MESSAGE, error_body, internal_error_response, unexpected_error_response
from lnarize_serve.health import RETRY_AFTER_SECONDS
from lnarize_serve.lifecycle import Phase

logger = logging.getLogger("lnarize_serve.middleware")
access_logger = logging.getLogger("lnarize_serve.access")

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept only if it cannot forge or flood a log line.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def send_json_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            if _CLIENT_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class AccessLogMiddleware:
    """One line per request on ``lnarize_serve.access``: method, path, status,
    duration and request id (never the body or the query string).

    The request id is the client's X-Request-Id or a generated one; it is put
    into the request's headers (vLLM names its engine request after it) and
    returned in the response's X-Request-Id header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = request_id_of(scope["headers"])
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != REQUEST_ID_HEADER]
        scope = dict(scope, headers=[*headers, (REQUEST_ID_HEADER, request_id.encode())])
        status = 500

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = dict(message, headers=[*response_headers, (REQUEST_ID_HEADER, request_id.encode())])
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            access_logger.info(
                "%s %s %d %.1fms request_id=%s",
                scope["method"],
                scope["path"],
                status,
                (time.monotonic() - started) * 1000,
                request_id,
            )


class RequestAccountingMiddleware:
    """Counts every HTTP request by route and final status (lnarize_requests_total)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            scope["app"].state.metrics.observe_request(scope["path"], status, time.monotonic() - started)


class InternalErrorShieldMiddleware:
    """No 500 leaves the server with internals in it: the body is replaced by a
    generic message carrying an error id, and the original goes to the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False
        swallowing = False
        swallowed: list[bytes] = []

        async def shielded_send(message: Message) -> None:
            nonlocal response_started, swallowing
            if message["type"] == "http.response.start":
                response_started = True
                if message["status"] == 500:
                    swallowing = True
                    return
            if swallowing and message["type"] == "http.response.body":
                swallowed.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send_generic_500(send, b"".join(swallowed))
                return
            await send(message)

        try:
            await self.app(scope, receive, shielded_send)
        except Exception as exc:
            if response_started and not swallowing:
                # Headers already went out (a stream broke midway): nothing
                # more can be said over HTTP; log and close the connection.
                logger.exception("request failed after its response started: %s %s", scope["method"], scope["path"])
                return
            response = unexpected_error_response(exc, scope["method"], scope["path"])
            await response(scope, receive, send)


async def _send_generic_500(send: Send, original_body: bytes) -> None:
    response = internal_error_response(detail=original_body[:2000].decode("utf-8", "replace"))
    await send({"type": "http.response.start", "status": 500, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on /v1/*; probes and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_api_path(scope["path"]):
            presented = dict(scope["headers"]).get(b"authorization", b"")
            # The auth scheme is case-insensitive (RFC 9110 section 11.1); the key is not.
            scheme, _, token = presented.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                message = "Missing API key" if not presented else "Invalid API key"
                await send_json_error(
                    send, 401, f"{message}: send 'Authorization: Bearer <key>'.", {"WWW-Authenticate": "Bearer"}
                )
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by Content-Length or by counting the bytes.

    The body of an accepted request is read here and replayed to the app in one
    message; later receive() calls go to the client (so disconnects still reach
    vLLM's cancellation logic)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay_receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)

    async def _reject(self, send: Send) -> None:
        await send_json_error(
            send, 413, f"Request body too large: the limit is {self.max_bytes} bytes (LNARIZE_MAX_REQUEST_BYTES)."
        )


_NOT_READY_MESSAGES: dict[Phase, str] = {
    Phase.LOADING: "The model is still loading; retry shortly.",
    Phase.WARMING: "The model is warming up; retry shortly.",
    Phase.DRAINING: "The server is shutting down and accepts no new requests.",
    Phase.DEAD: ENGINE_DEAD_MESSAGE,
    Phase.FAILED: "The inference engine failed to start.",
}


class AdmissionMiddleware:
    """Admits /v1/* only while ready (else 503 + Retry-After) and counts in-flight requests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        state: Any = scope["app"].state
        lifecycle = state.lifecycle
        if not lifecycle.ready:
            await send_json_error(
                send, 503, _NOT_READY_MESSAGES.get(lifecycle.phase, "Not ready."), {"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
            return
        lifecycle.request_started()
        state.metrics.in_flight.set(lifecycle.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            lifecycle.request_finished()
            state.metrics.in_flight.set(lifecycle.in_flight)


def sse_error_event(status: int, message: str) -> bytes:
    return f"data: {json.dumps(error_body(status, message))}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


# How long a cut waits for the cancelled request handler to unwind.
CUT_UNWIND_SECONDS = 2.0


class ResponseCutMiddleware:
    """Ends open /v1 responses cleanly when the server cannot finish them.

    When the lifecycle asks for a cut (drain timeout, dead engine), the request
    handler is cancelled and the client gets a 503 in OpenAI's shape: an error
    event and ``data: [DONE]`` on a stream, a JSON error before any response.
    A stream whose engine died ends the same way: vLLM's own error event (a
    500 naming its internals) is replaced by the 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        state: Any = scope["app"].state
        lifecycle = state.lifecycle
        started = time.monotonic()
        streaming = False
        response_started = False
        response_done = False
        cut = False

        async def guarded_send(message: Message) -> None:
            nonlocal streaming, response_started, response_done
            if cut or response_done:
                return
            if message["type"] == "http.response.start":
                response_started = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if streaming and message.get("body", b"").startswith(b'data: {"error"') and state.runtime.engine_dead:
                    logger.warning(
                        "%s %s ended by the dead engine after %.1f s: the client got a 503 error event",
                        scope["method"], scope["path"], time.monotonic() - started,
                    )
                    message = {**message, "body": sse_error_event(503, ENGINE_DEAD_MESSAGE)}
                response_done = not message.get("more_body", False)
            await send(message)

        handler = asyncio.get_running_loop().create_task(self.app(scope, receive, guarded_send))
        cut_waiter = asyncio.ensure_future(lifecycle.cut_requested.wait())
        try:
            await asyncio.wait({handler, cut_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if handler.done():
                handler.result()  # re-raises what the handler raised
                return
            cut = True
            handler.cancel()
            await asyncio.wait({handler}, timeout=CUT_UNWIND_SECONDS)
            if response_done:
                return
            logger.warning(
                "cut %s %s after %.1f s (%s): the client got a 503 %s",
                scope["method"], scope["path"], time.monotonic() - started, lifecycle.cut_reason,
                "error event" if streaming else ("end of body" if response_started else "response"),
            )
            if streaming:
                await send({"type": "http.response.body", "body": sse_error_event(503, lifecycle.cut_message) + SSE_DONE, "more_body": False})
            elif response_started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await send_json_error(send, 503, lifecycle.cut_message, {"Retry-After": str(RETRY_AFTER_SECONDS)})
        finally:
            cut_waiter.cancel()
            if not handler.done():
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({handler}, timeout=CUT_UNWIND_SECONDS)
