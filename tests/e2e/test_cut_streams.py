"""End to end: streams the server cannot finish end with an OpenAI-shaped 503
error event and `data: [DONE]`, never a broken chunked read or a traceback.

Two ways a stream is cut, each on its own cpu-demo server (both end it):
the drain timeout expires while it is generating (exit 0), and the vLLM
engine core process is killed under it (exit 3).

Generations ask for 8000 tokens with ignore_eos, so every stream is still
running when it is cut on any CPU (the cpu-demo makes a few hundred tokens a
second at most).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from lnarize_serve.runtime import EXIT_ENGINE_DIED
from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
# Longer than all the probing after SIGTERM (at most 20 s), so the cut never
# races the probes on a slow machine.
DRAIN_TIMEOUT = 30
ENDLESS_STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}],
    "max_tokens": 8000,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def start_server(server_logs, name: str):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_MAX_NUM_SEQS="4",
        LNARIZE_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
    )
    return running_server(env, server_logs / f"{name}.log")


@pytest.fixture
def draining_server(demo_model_path, server_logs):
    yield from start_server(server_logs, "cut-at-drain-timeout")


@pytest.fixture
def dying_server(demo_model_path, server_logs):
    yield from start_server(server_logs, "engine-killed")


def open_stream(stack: contextlib.ExitStack, server) -> tuple[httpx.Response, object]:
    """An endless chat stream that has produced its first event."""
    client = stack.enter_context(httpx.Client(timeout=120))
    response = stack.enter_context(client.stream("POST", f"{server.url}{CHAT}", json=ENDLESS_STREAM))
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    return response, lines


def rest_of_stream(lines) -> list[str]:
    """The remaining data lines; a broken chunked read raises here."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def assert_ends_with_503_event(events: list[str], message_part: str) -> None:
    assert events[-1] == "[DONE]", events[-3:]
    error_events = [json.loads(e) for e in events[:-1] if e.startswith('{"error"')]
    assert len(error_events) == 1 and json.loads(events[-2]) == error_events[0], events[-3:]
    error = error_events[0]["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503, error
    assert message_part in error["message"], error
    # Cut mid-generation: no choice ever finished.
    for event in events[:-2]:
        assert all(not c.get("finish_reason") for c in json.loads(event).get("choices", [])), event


def ready_detail(server) -> str:
    """Readiness detail once the drain has begun (the signal is handled asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        body = httpx.get(f"{server.url}/health/ready", timeout=10).json()
        if body.get("phase") == "draining" or time.monotonic() > deadline:
            assert body.get("phase") == "draining", body
            return body["detail"]
        time.sleep(0.1)


def test_drain_timeout_ends_open_streams_with_a_503_event(draining_server):
    server = draining_server
    with contextlib.ExitStack() as stack:
        leaving, _ = open_stream(stack, server)
        staying, staying_lines = open_stream(stack, server)

        server.send_signal(signal.SIGTERM)
        assert ready_detail(server) == "draining 2 in-flight request(s)"

        # One client hangs up; readiness then counts the one left.
        leaving.close()
        deadline = time.monotonic() + 10
        while (detail := ready_detail(server)) != "draining 1 in-flight request(s)" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert detail == "draining 1 in-flight request(s)"

        events = rest_of_stream(staying_lines)
    assert_ends_with_503_event(events, f"drain timeout ({DRAIN_TIMEOUT} s)")
    assert server.wait_exit(timeout=30) == 0, server.log_tail()
    log = server.log_path.read_text()
    assert "Traceback" not in log, server.log_tail(80)
    # The server shut the engine down itself: no engine-death error either.
    assert "EngineDeadError" not in log, server.log_tail(80)
    assert log.count(f"cut POST {CHAT}") == 1, server.log_tail(80)


def engine_core(server) -> psutil.Process:
    cores = [p for p in psutil.Process(server.process.pid).children(recursive=True) if p.name().startswith("VLLM::EngineCor")]
    assert len(cores) == 1, cores
    return cores[0]


def test_killed_engine_ends_open_streams_with_a_503_event_and_exits_3(dying_server):
    server = dying_server
    liveness: list[int] = []
    stop_polling = threading.Event()

    def poll_liveness():
        while not stop_polling.is_set():
            try:
                liveness.append(httpx.get(f"{server.url}/health/live", timeout=5).status_code)
            except httpx.TransportError:
                if server.process.poll() is not None:
                    return
            time.sleep(0.05)

    with contextlib.ExitStack() as stack:
        streams = [open_stream(stack, server)[1] for _ in range(3)]
        poller = threading.Thread(target=poll_liveness, daemon=True)
        poller.start()
        deadline = time.monotonic() + 30
        while not liveness and time.monotonic() < deadline:
            time.sleep(0.05)
        engine_core(server).kill()
        for lines in streams:
            assert_ends_with_503_event(rest_of_stream(lines), "engine has died")
    try:
        assert server.wait_exit(timeout=60) == EXIT_ENGINE_DIED, server.log_tail()
    finally:
        stop_polling.set()
        poller.join(timeout=10)
    assert 503 in liveness, liveness
    assert liveness[0] == 200, liveness
    log = server.log_path.read_text()
    assert "Traceback" not in log, server.log_tail(80)
