"""ResponseCutMiddleware on its own: what a client receives when the server
cuts a response it cannot finish (drain timeout, dead engine). The inner apps
here stand in for vLLM's handlers so each state of a response (not started,
streaming) can be cut at a known point; tests/e2e/test_cut_streams.py cuts
real streams on the real engine."""

import asyncio
import json
from types import SimpleNamespace

from lnarize_serve.lifecycle import Lifecycle
from lnarize_serve.middleware import ResponseCutMiddleware

CUT_MESSAGE = "The server is shutting down."


def run_cut(inner_app, cut_when_sent: int, engine_dead: bool = False):
    """Run the middleware around ``inner_app``; cut once ``cut_when_sent`` messages went out."""
    lifecycle = Lifecycle()
    state = SimpleNamespace(lifecycle=lifecycle, runtime=SimpleNamespace(engine_dead=engine_dead))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "app": SimpleNamespace(state=state)}
    sent = []
    inner_cancelled = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.Event().wait()

    async def tracking_inner(scope, receive, send):
        try:
            await inner_app(scope, receive, send)
        except asyncio.CancelledError:
            inner_cancelled.append(True)
            raise

    async def main():
        middleware = asyncio.ensure_future(ResponseCutMiddleware(tracking_inner)(scope, receive, send))
        while len(sent) < cut_when_sent:
            await asyncio.sleep(0.01)
        lifecycle.cut_open_responses("drain timeout", CUT_MESSAGE)
        await asyncio.wait_for(middleware, timeout=5)

    asyncio.run(main())
    return sent, bool(inner_cancelled)


async def endless_stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
    await asyncio.Event().wait()


async def never_answers(scope, receive, send):
    await asyncio.Event().wait()


def test_cut_stream_gets_an_error_event_then_done():
    sent, cancelled = run_cut(endless_stream, cut_when_sent=2)
    assert cancelled
    last = sent[-1]
    assert last["type"] == "http.response.body" and last["more_body"] is False
    error_event, done, end = last["body"].decode().split("\n\n")
    assert done == "data: [DONE]" and end == ""
    assert json.loads(error_event.removeprefix("data: ")) == {
        "error": {"message": CUT_MESSAGE, "type": "ServiceUnavailableError", "param": None, "code": 503}
    }


def test_cut_before_the_response_started_is_a_503_json_error():
    sent, cancelled = run_cut(never_answers, cut_when_sent=0)
    assert cancelled
    start, body = sent
    assert start["status"] == 503
    assert (b"retry-after", b"5") in start["headers"]
    assert json.loads(body["body"])["error"]["type"] == "ServiceUnavailableError"


async def vllm_stream_hit_by_engine_death(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    error = {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "param": None, "code": 500}}
    await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_vllm_error_event_from_a_dead_engine_becomes_a_503():
    sent, _ = run_cut(vllm_stream_hit_by_engine_death, cut_when_sent=4, engine_dead=True)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    error = json.loads(bodies[0].decode().removeprefix("data: "))["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    assert "engine has died" in error["message"]
    assert bodies[1:] == [b"data: [DONE]\n\n", b""]
