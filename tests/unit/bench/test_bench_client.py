"""The bench client against a tiny fake stream server.

A fake is used only for what a real vLLM server cannot show on demand: exact,
scripted chunk timings (to check TTFT/ITL are measured from the right
instants), failures in the middle of a stream, a stream cut before [DONE], a
server that sends no usage, and a server that refuses vLLM's ignore_eos /
min_tokens fields. The real-server path is tests/e2e/test_bench.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from lnarize_serve.bench.client import ChatEndpoint, make_http_client, stream_chat
from lnarize_serve.bench.driver import GridSpec, prepare_target, run_grid
from lnarize_serve.bench.stats import Cell

FIRST_TOKEN_DELAY = 0.30
TOKEN_GAP = 0.08


def _chunk(content: str | None = None, usage: dict | None = None, role: str | None = None) -> str:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": "x", "object": "chat.completion.chunk", "choices": [] if usage else [{"index": 0, "delta": delta}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _scripted_stream(behaviour: str, max_tokens: int) -> AsyncIterator[str]:
    yield _chunk(content="", role="assistant")  # vLLM's empty first chunk must not count as the first token
    await asyncio.sleep(FIRST_TOKEN_DELAY)
    for i in range(max_tokens):
        if i:
            await asyncio.sleep(TOKEN_GAP)
        if behaviour == "error-midstream" and i == 2:
            yield f"data: {json.dumps({'error': {'message': 'engine died', 'type': 'InternalServerError'}})}\n\n"
            return
        yield _chunk(content=f" t{i}")
    if behaviour == "cut":
        return  # connection closes without [DONE]
    if behaviour != "no-usage":
        yield _chunk(usage={"prompt_tokens": 42, "completion_tokens": max_tokens, "total_tokens": 42 + max_tokens})
    yield "data: [DONE]\n\n"


async def chat(request: Request):
    body = await request.json()
    behaviour = body["model"]
    if behaviour == "http500":
        return JSONResponse({"error": {"message": "boom", "type": "InternalServerError"}}, status_code=500)
    if behaviour == "strict" and ("ignore_eos" in body or "min_tokens" in body):
        return JSONResponse({"error": {"message": "unknown field ignore_eos", "type": "BadRequest"}}, status_code=400)
    if not body.get("stream"):
        return JSONResponse({"choices": [{"message": {"content": "hi"}}],
                             "usage": {"prompt_tokens": 10 + len(body["messages"][0]["content"].split()),
                                       "completion_tokens": 1}})
    return StreamingResponse(_scripted_stream(behaviour, body["max_tokens"]), media_type="text/event-stream")


async def models(request: Request):
    return JSONResponse({"data": [{"id": "strict"}]})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def one_request(base_url: str, behaviour: str, max_tokens: int = 5):
    async def go():
        endpoint = ChatEndpoint(base_url, behaviour)
        async with make_http_client(1, endpoint) as http:
            return await stream_chat(http, endpoint, [{"role": "user", "content": "x"}], max_tokens)

    return asyncio.run(go())


def test_ttft_and_gaps_are_measured_from_the_first_text_chunk(fake_server):
    result = one_request(fake_server, "timed", max_tokens=5)
    assert result.ok, result.error
    assert result.usage_reported and result.completion_tokens == 5 and result.prompt_tokens == 42
    assert len(result.chunk_times) == 5  # the empty role chunk is not a token
    # Token i leaves the server FIRST_TOKEN_DELAY + i * TOKEN_GAP after the
    # request at the earliest; scheduling jitter on a busy 2-core box only adds
    # delay to a receipt (a late chunk can shorten the gap after it, so gaps
    # are not bounded below one by one; the times since the start are).
    assert FIRST_TOKEN_DELAY <= result.ttft < FIRST_TOKEN_DELAY + 0.15
    since_start = [t - result.start for t in result.chunk_times]
    for i, elapsed in enumerate(since_start):
        earliest = FIRST_TOKEN_DELAY + i * TOKEN_GAP
        assert earliest - 0.005 <= elapsed < earliest + 0.25, (i, since_start)


def test_an_error_event_mid_stream_fails_the_request(fake_server):
    result = one_request(fake_server, "error-midstream")
    assert not result.ok and "engine died" in result.error


def test_http_errors_carry_the_openai_message(fake_server):
    result = one_request(fake_server, "http500")
    assert result.error == "HTTP 500: boom"


def test_a_stream_cut_before_done_is_an_error(fake_server):
    result = one_request(fake_server, "cut")
    assert result.error == "stream ended before [DONE]"


def test_without_usage_chunks_are_counted(fake_server):
    result = one_request(fake_server, "no-usage", max_tokens=4)
    assert result.ok and not result.usage_reported and result.output_tokens == 4


def test_a_server_refusing_ignore_eos_is_benchmarked_without_it_and_says_so(fake_server):
    async def go():
        endpoint = ChatEndpoint(fake_server, "")
        async with make_http_client(2, endpoint) as http:
            target = await prepare_target(http, endpoint, None, tokenizer="none")
            spec = GridSpec([2], [60], 3, requests_per_cell=2, warmup_per_cell=1)
            stats, skipped = await run_grid(http, target, spec, deadline=time.perf_counter() + 60)
            return target, stats, skipped

    target, stats, skipped = asyncio.run(go())
    assert target.endpoint.model == "strict"
    assert target.endpoint.fixed_length_fields is False
    assert any("refused ignore_eos" in note for note in target.notes)
    # No tokenizer: lengths calibrated from the server's usage counts (10 + words here).
    assert not target.prompts.exact and any("approximate" in note for note in target.notes)
    assert not skipped and stats[0].requests == 2 and stats[0].errors == 0
    assert stats[0].ttft_ms_p50 >= FIRST_TOKEN_DELAY * 1000


def test_the_time_bound_cuts_a_cell_and_skips_the_rest(fake_server):
    async def go():
        endpoint = ChatEndpoint(fake_server, "strict", fixed_length_fields=False)
        async with make_http_client(1, endpoint) as http:
            target = await prepare_target(http, endpoint, "strict", tokenizer="none")
            # Each request takes >= 0.3 + 19 * 0.08 s; a 2.5 s bound ends the first cell early.
            spec = GridSpec([1], [60, 80], 20, requests_per_cell=5, warmup_per_cell=0)
            started = time.perf_counter()
            stats, skipped = await run_grid(http, target, spec, deadline=started + 2.5)
            return stats, skipped, time.perf_counter() - started

    stats, skipped, elapsed = asyncio.run(go())
    assert elapsed < 4.0
    assert len(stats) == 1 and not stats[0].complete and stats[0].requests == 1
    assert skipped == [Cell(1, 80, 20)]
