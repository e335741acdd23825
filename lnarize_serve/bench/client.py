"""One streamed chat completion, timed chunk by chunk (httpx, Server-Sent Events).

Timing points per request, all from one monotonic clock:
    start        the request is handed to the connection pool
    chunks       arrival of every SSE chunk that carries generated text
                 (content or reasoning_content); the first one is the TTFT
    end          the stream's last byte ([DONE])
Token counts come from the final usage chunk (``stream_options.include_usage``);
a server that sends none falls back to counting text chunks, and the result
says so (``usage_reported``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx


class ServerUnreachable(RuntimeError):
    """The endpoint cannot be reached at all (connection refused, DNS, TLS)."""


@dataclass
class RequestResult:
    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_reported: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def output_tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.chunk_times)


def normalize_base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is kept as given."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--base-url must look like http://host:port/v1, got {url!r}")
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass
class ChatEndpoint:
    """Where and how to send requests; shared by every request of a run."""

    base_url: str
    model: str
    api_key: str | None = None
    # Extra request fields that force the output length (vLLM: ignore_eos, min_tokens).
    fixed_length_fields: bool = True
    request_timeout: float = 600.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, messages: list[dict[str, str]], max_tokens: int, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            # Greedy: the cheapest sampler, the same work on every server.
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.fixed_length_fields:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        return body


def make_http_client(concurrency: int, endpoint: ChatEndpoint) -> httpx.AsyncClient:
    # One keep-alive connection per stream, so no request waits for a socket.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(endpoint.request_timeout, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=endpoint.headers())


def _error_text(status: int, payload: bytes) -> str:
    try:
        message = json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = payload.decode("utf-8", "replace")[:200]
    return f"HTTP {status}: {message}"


async def stream_chat(
    client: httpx.AsyncClient, endpoint: ChatEndpoint, messages: list[dict[str, str]], max_tokens: int
) -> RequestResult:
    """Send one streamed request; never raises for server-side failures (they land in ``error``)."""
    url = endpoint.base_url + "/chat/completions"
    result = RequestResult(start=time.perf_counter(), end=0.0)
    try:
        async with client.stream("POST", url, json=endpoint.body(messages, max_tokens)) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, await response.aread())
            else:
                await _consume_events(response, result)
    except httpx.ConnectError as exc:
        raise ServerUnreachable(f"cannot connect to {url}: {exc}") from exc
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    result.end = time.perf_counter()
    if result.ok and not result.chunk_times:
        result.error = "stream ended without any generated text"
    return result


async def _consume_events(response: httpx.Response, result: RequestResult) -> None:
    finished = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            finished = True
            break
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except ValueError:
            result.error = f"malformed stream chunk: {data[:120]!r}"
            return
        if "error" in chunk:
            error = chunk["error"]
            result.error = f"stream error: {error.get('message', error) if isinstance(error, dict) else error}"
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                result.chunk_times.append(now)
                break
        usage = chunk.get("usage")
        if usage:
            result.usage_reported = True
            result.prompt_tokens = usage.get("prompt_tokens")
            result.completion_tokens = usage.get("completion_tokens")
    if not finished:
        result.error = "stream ended before [DONE]"


async def count_prompt_tokens(
    client: httpx.AsyncClient, endpoint: ChatEndpoint, messages: list[dict[str, str]]
) -> int | None:
    """The server's prompt token count for these messages (a non-streamed max_tokens=1 probe)."""
    url = endpoint.base_url + "/chat/completions"
    body = endpoint.body(messages, 1, stream=False)
    # One token is enough to read the count; no need for fields a server may refuse.
    body.pop("min_tokens", None)
    body.pop("ignore_eos", None)
    try:
        response = await client.post(url, json=body)
    except httpx.ConnectError as exc:
        raise ServerUnreachable(f"cannot connect to {url}: {exc}") from exc
    if response.status_code != 200:
        raise RuntimeError(_error_text(response.status_code, response.content))
    return (response.json().get("usage") or {}).get("prompt_tokens")


async def list_models(client: httpx.AsyncClient, endpoint: ChatEndpoint) -> list[dict[str, Any]]:
    url = endpoint.base_url + "/models"
    try:
        response = await client.get(url)
    except httpx.ConnectError as exc:
        raise ServerUnreachable(f"cannot connect to {url}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"{url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} -> {_error_text(response.status_code, response.content)}")
    return list(response.json().get("data") or [])


async def probe_fixed_length_support(
    client: httpx.AsyncClient, endpoint: ChatEndpoint, messages: list[dict[str, str]]
) -> str | None:
    """Try one request with ignore_eos/min_tokens; return the server's refusal, or None if accepted."""
    url = endpoint.base_url + "/chat/completions"
    body = endpoint.body(messages, 2, stream=False)
    try:
        response = await client.post(url, json=body)
    except httpx.ConnectError as exc:
        raise ServerUnreachable(f"cannot connect to {url}: {exc}") from exc
    if response.status_code == 200:
        return None
    if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 404):
        return _error_text(response.status_code, response.content)
    raise RuntimeError(f"POST {url} -> {_error_text(response.status_code, response.content)}")
