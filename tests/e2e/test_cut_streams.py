"""End to end: streams the server cannot finish end with an OpenAI-shaped 503
error event and `data: [DONE]`, never a broken chunked read or a traceback;
while draining, readiness counts the requests still in flight.

Each case runs on its own cpu-demo server (each ends it): the drain timeout
expires while a stream is generating (exit 0), clients leave a drain one by
one (exit 0), and the vLLM engine core process is killed under open streams
(exit 3).

Generations ask for 8000 tokens with ignore_eos, so every stream is still
running when it is cut on any CPU (the cpu-demo makes a few hundred tokens a
second at most). What the tests time, they time on the server: connections
are opened before generation starts, and where a test probes a drain it
freezes the engine first, so a slow or stalled test process cannot make the
server finish before the probe.
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
# The cut case probes nothing while it runs, so its drain can be short.
CUT_DRAIN_TIMEOUT = 5
# The counting case ends its drain itself (its clients leave); this only
# bounds a run that went wrong.
COUNTING_DRAIN_TIMEOUT = 600
ENDLESS_STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}],
    "max_tokens": 8000,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def start_server(server_logs, name: str, drain_timeout: int):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_MAX_NUM_SEQS="4",
        LNARIZE_DRAIN_TIMEOUT=str(drain_timeout),
    )
    return running_server(env, server_logs / f"{name}.log")


@pytest.fixture
def cut_server(demo_model_path, server_logs):
    yield from start_server(server_logs, "cut-at-drain-timeout", CUT_DRAIN_TIMEOUT)


@pytest.fixture
def counting_server(demo_model_path, server_logs):
    yield from start_server(server_logs, "drain-counted-down", COUNTING_DRAIN_TIMEOUT)


@pytest.fixture
def dying_server(demo_model_path, server_logs):
    yield from start_server(server_logs, "engine-killed", CUT_DRAIN_TIMEOUT)


def open_streams(stack: contextlib.ExitStack, server, count: int) -> list[tuple[httpx.Response, object]]:
    """``count`` endless chat streams, each past its first event. Every
    connection is opened and every request sent before any event is awaited."""
    clients = [stack.enter_context(server.connected_client(timeout=120)) for _ in range(count)]
    responses = [stack.enter_context(client.stream("POST", CHAT, json=ENDLESS_STREAM)) for client in clients]
    streams = []
    for response in responses:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        streams.append((response, lines))
    return streams


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


def drain_detail(probe: httpx.Client, expected: str) -> str:
    """Readiness detail once it reads ``expected`` (the signal and a client's
    hang-up are handled asynchronously); the last one seen after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        body = probe.get("/health/ready").json()
        if body.get("detail") == expected or time.monotonic() > deadline:
            assert body.get("phase") == "draining", body
            return body["detail"]
        time.sleep(0.1)


def assert_clean_log(server, cuts: int) -> None:
    log = server.log_path.read_text()
    assert "Traceback" not in log, server.log_tail(80)
    # The server shut the engine down itself: no engine-death error either.
    assert "EngineDeadError" not in log, server.log_tail(80)
    assert log.count(f"cut POST {CHAT}") == cuts, server.log_tail(80)


def test_drain_timeout_ends_an_open_stream_with_a_503_event(cut_server):
    server = cut_server
    with contextlib.ExitStack() as stack:
        [(_, lines)] = open_streams(stack, server, 1)
        server.send_signal(signal.SIGTERM)
        events = rest_of_stream(lines)
    assert_ends_with_503_event(events, f"drain timeout ({CUT_DRAIN_TIMEOUT} s)")
    assert server.wait_exit(timeout=60) == 0, server.log_tail()
    assert_clean_log(server, cuts=1)


def test_readiness_counts_the_drain_down_as_clients_leave_then_the_server_exits_0(counting_server):
    server = counting_server
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(server.connected_client(timeout=30))
        # Both line iterators are kept: dropping one closes its stream.
        (leaving, _leaving_lines), (staying, _staying_lines) = open_streams(stack, server, 2)
        # Frozen, the engine finishes nothing: both requests stay in flight for
        # as long as the probing takes.
        with server.frozen_engine():
            server.send_signal(signal.SIGTERM)
            assert drain_detail(probe, "draining 2 in-flight request(s)") == "draining 2 in-flight request(s)"
            leaving.close()
            assert drain_detail(probe, "draining 1 in-flight request(s)") == "draining 1 in-flight request(s)"
        staying.close()
        assert server.wait_exit(timeout=60) == 0, server.log_tail()
    log = server.log_path.read_text()
    assert "drained; stopping" in log, server.log_tail(40)
    assert_clean_log(server, cuts=0)


def engine_core(server) -> psutil.Process:
    cores = [p for p in psutil.Process(server.process.pid).children(recursive=True) if p.name().startswith("VLLM::EngineCor")]
    assert len(cores) == 1, cores
    return cores[0]


def test_killed_engine_ends_open_streams_with_a_503_event_and_exits_3(dying_server):
    server = dying_server
    liveness: list[int] = []
    stop_polling = threading.Event()

    def poll_liveness(probe: httpx.Client) -> None:
        while not stop_polling.is_set():
            try:
                liveness.append(probe.get("/health/live").status_code)
            except httpx.TransportError:
                if server.process.poll() is not None:
                    return
            time.sleep(0.05)

    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(server.connected_client(timeout=5))
        # Polling from the start keeps the probe's connection open throughout.
        poller = threading.Thread(target=poll_liveness, args=(probe,), daemon=True)
        poller.start()
        streams = [lines for _, lines in open_streams(stack, server, 3)]
        probes_before = len(liveness)
        deadline = time.monotonic() + 30
        while len(liveness) == probes_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert liveness[probes_before:][:1] == [200], liveness  # alive while generating
        engine_core(server).kill()
        for lines in streams:
            assert_ends_with_503_event(rest_of_stream(lines), "engine has died")
        try:
            assert server.wait_exit(timeout=60) == EXIT_ENGINE_DIED, server.log_tail()
        finally:
            stop_polling.set()
            poller.join(timeout=10)
    assert 503 in liveness, liveness
    log = server.log_path.read_text()
    assert "Traceback" not in log, server.log_tail(80)
