"""End to end: `python -m lnarize_serve` with the cpu-demo profile (SmolLM2 on
vLLM's CPU engine), driven by the official `openai` client and raw HTTP.

One server for the whole module; the SIGTERM test ends it and therefore runs
last (tests run in file order).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env

pytestmark = pytest.mark.e2e

API_KEY = "sk-e2e-test"
MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 256 * 1024
# The SIGTERM test freezes the engine while it probes the drain; this only
# bounds a run that went wrong.
DRAIN_TIMEOUT = 300


@pytest.fixture(scope="module")
def server(demo_model_path, server_logs):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_API_KEY=API_KEY,
        LNARIZE_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
        LNARIZE_MAX_NUM_SEQS="4",
        LNARIZE_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        LNARIZE_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
    )
    yield from running_server(env, server_logs / "demo-server.log")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def assert_openai_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == error_type, error
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error


# Readiness -------------------------------------------------------------------


def test_readiness_was_503_while_loading_then_200(server):
    codes = server.startup_ready_codes
    assert codes[0] == 503, codes
    assert codes[-1] == 200
    body = httpx.get(f"{server.url}/health/ready").json()
    assert body["status"] == "ready"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/health/live").json()["status"] == "alive"


def test_start_up_log_names_the_dtype_and_cpu_isa(server):
    from lnarize_serve.cpu_engine import detected_isa

    assert f"CPU engine: dtype float32, CPU ISA {detected_isa()}" in server.log_path.read_text()


def test_models_lists_the_served_name(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


# Generation ------------------------------------------------------------------


def test_readme_question_is_answered_as_the_readme_shows(client):
    # README's example, verbatim: right on every x86 CPU (the demo runs float32).
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=64,
    )
    answer = completion.choices[0].message.content
    assert answer == "The capital of France is Paris.", answer
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish_reasons, usages = "", [], []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "Paris" in text
    assert finish_reasons in (["stop"], ["length"])
    assert len(usages) == 1 and usages[0].completion_tokens > 0
    assert usages[0].total_tokens == usages[0].prompt_tokens + usages[0].completion_tokens


def test_stop_sequence_cuts_the_output(client):
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    full = client.chat.completions.create(**request).choices[0].message.content
    stop_word = "Paris"
    assert stop_word in full
    stopped = client.chat.completions.create(**request, stop=[stop_word]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[: full.index(stop_word)]


def test_max_tokens_and_sampling_knobs(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
        max_tokens=5,
        temperature=0.7,
        top_p=0.9,
        extra_body={"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_legacy_completions(client):
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text.strip()
    assert completion.usage.completion_tokens <= 4


def test_tools_request_is_accepted(client):
    # SmolLM2 is no tool-calling model; this proves the tool parser is wired
    # in and a tools request is served (not rejected) with the production parser.
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ],
        tool_choice="auto",
        max_tokens=16,
        temperature=0,
    )
    assert completion.choices[0].finish_reason in ("stop", "length", "tool_calls")


# Bad input: status and OpenAI error shape, server keeps answering -----------

CHAT = "/v1/chat/completions"
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "error_type", "message_part"),
    [
        ("missing messages", CHAT, {"model": MODEL}, 400, "BadRequestError", "messages"),
        ("temperature not a number", CHAT, {"model": MODEL, "messages": GOOD_MESSAGES, "temperature": "hot"}, 400, "BadRequestError", "temperature"),
        ("negative max_tokens", CHAT, {"model": MODEL, "messages": GOOD_MESSAGES, "max_tokens": -5}, 400, "BadRequestError", "max_tokens"),
        ("max_tokens over the context", CHAT, {"model": MODEL, "messages": GOOD_MESSAGES, "max_tokens": MAX_MODEL_LEN + 1}, 400, "BadRequestError", ""),
        ("unknown model", CHAT, {"model": "gpt-17", "messages": GOOD_MESSAGES}, 404, "NotFoundError", "gpt-17"),
        ("messages not a list", CHAT, {"model": MODEL, "messages": "hello"}, 400, "BadRequestError", "messages"),
        ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": "word " * 12000, "max_tokens": 4}, 400, "BadRequestError", ""),
    ],
)
def test_bad_requests(server, name, path, body, status, error_type, message_part):
    response = httpx.post(f"{server.url}{path}", json=body, headers=auth(), timeout=60)
    error = assert_openai_error(response, status, error_type)
    assert message_part.lower() in error["message"].lower(), error
    assert "Traceback" not in error["message"]


def test_invalid_json_is_400(server):
    response = httpx.post(
        f"{server.url}{CHAT}", content=b'{"model": ', headers={**auth(), "content-type": "application/json"}
    )
    assert_openai_error(response, 400, "BadRequestError")


def test_body_over_the_limit_is_413(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]}
    response = httpx.post(f"{server.url}{CHAT}", json=body, headers=auth())
    assert_openai_error(response, 413, "RequestTooLargeError")


def test_api_key_required_on_v1_only(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401, "AuthenticationError")
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_openai_error(wrong, 401, "AuthenticationError")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def assert_bad_request(exc_info: pytest.ExceptionInfo, param: str, message_part: str) -> None:
    error = exc_info.value.body
    assert exc_info.value.status_code == 400
    assert error["type"] == "BadRequestError" and error["code"] == 400, error
    assert error["param"] == param, error
    assert message_part in error["message"], error


def test_unknown_role_is_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "wizard", "content": "abracadabra"}], max_tokens=2
        )
    assert_bad_request(refused, "messages[0].role", "'wizard'")


@pytest.mark.parametrize(
    "body",
    [
        # vLLM's request models iterate these before pydantic checks their
        # type; found by the API fuzzer as 500s.
        {"messages": False, "model": False, "structured_outputs": {"choice": [0.0, 0.0]}, "max_tokens": 4},
        {"messages": False, "model": MODEL, "max_tokens": 4},
        # read as a dict by a validator before its type is checked (AttributeError)
        {"messages": GOOD_MESSAGES, "model": MODEL, "max_tokens": 4, "structured_outputs": True},
        # integers vLLM's request models accept but its engine wire format
        # (64-bit msgpack) cannot carry; found by the API fuzzer as 500s
        {"messages": GOOD_MESSAGES, "model": MODEL, "max_tokens": 4, "top_k": 2**70},
        {"messages": GOOD_MESSAGES, "model": MODEL, "max_tokens": 4, "stop_token_ids": [2**70]},
    ],
)
def test_a_body_of_the_wrong_shape_is_400_not_500(server, body):
    response = httpx.post(f"{server.url}{CHAT}", json=body, headers=auth(), timeout=30)
    assert_openai_error(response, 400, "BadRequestError")
    assert "not iterable" not in response.text and "serialize" not in response.text


def test_an_image_for_the_text_only_model_is_400_not_500(client):
    # vLLM's message parsing raises a plain ValueError for this; found by the API fuzzer.
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1)
    assert "not a multimodal model" in refused.value.body["message"]


@pytest.mark.parametrize("n", [129, 1000])
def test_n_above_the_limit_is_400(client, n):
    # LNARIZE_MAX_N is at its default, OpenAI's 128.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=GOOD_MESSAGES, n=n, max_tokens=1)
    assert_bad_request(refused, "n", "128")
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hi", n=n, max_tokens=1)
    assert_bad_request(refused, "n", "128")


@pytest.mark.parametrize("parameters", [{"type": "nonsense"}, {"properties": 5}])
def test_tool_with_an_invalid_json_schema_is_400(client, parameters):
    good = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    bad = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=GOOD_MESSAGES, tools=[good, bad], max_tokens=2)
    assert_bad_request(refused, "tools[1].function.parameters", "not a valid JSON Schema")


def log_lines_during(server, action) -> list[str]:
    """The server log lines written while ``action`` ran (and its access line was flushed)."""
    start = server.log_path.stat().st_size
    request_id = action()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with server.log_path.open("rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace").splitlines()
        if any(f"request_id={request_id}" in line for line in lines):
            return lines
        time.sleep(0.1)
    raise AssertionError(f"no access log line for request id {request_id}:\n{server.log_tail()}")


def test_unknown_model_404_is_not_logged_as_an_error(server):
    def ask_for_an_unknown_model() -> str:
        body = {"model": "gpt-17", "messages": GOOD_MESSAGES}
        response = httpx.post(f"{server.url}{CHAT}", json=body, headers={**auth(), "X-Request-Id": "e2e-unknown-model"})
        assert_openai_error(response, 404, "NotFoundError")
        return "e2e-unknown-model"

    lines = log_lines_during(server, ask_for_an_unknown_model)
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines


def test_access_log_has_one_line_per_request_without_bodies(server):
    def chat_with_a_client_request_id() -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "body-marker-xyzzy"}], "max_tokens": 1}
        response = httpx.post(f"{server.url}{CHAT}", json=body, headers={**auth(), "X-Request-Id": "e2e-access-1"})
        assert response.status_code == 200 and response.headers["x-request-id"] == "e2e-access-1"
        return "e2e-access-1"

    lines = log_lines_during(server, chat_with_a_client_request_id)
    (access,) = [line for line in lines if "request_id=e2e-access-1" in line]
    assert "lnarize_serve.access" in access
    method, path, status, duration, request_id = access.split(": ", 1)[1].split()
    assert (method, path, status, request_id) == ("POST", CHAT, "200", "request_id=e2e-access-1")
    assert duration.endswith("ms") and float(duration[:-2]) > 0
    assert not [line for line in lines if "body-marker-xyzzy" in line]
    # uvicorn's own access log is off: no second line for the same request.
    assert not [line for line in lines if '"POST /v1/chat/completions HTTP/1.1"' in line], lines

    def probe_without_a_request_id() -> str:
        response = httpx.get(f"{server.url}/health/ready")
        assert response.status_code == 200
        return response.headers["x-request-id"]

    lines = log_lines_during(server, probe_without_a_request_id)
    assert [line for line in lines if "GET /health/ready 200 " in line]


def test_server_still_answers_after_bad_input(client):
    completion = client.chat.completions.create(model=MODEL, messages=GOOD_MESSAGES, max_tokens=2, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")


# Metrics ----------------------------------------------------------------------


def test_metrics_names(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "lnarize_build_info",
        "lnarize_settings_info",
        "lnarize_ready",
        "lnarize_phase",
        "lnarize_requests_total",
        "lnarize_request_duration_seconds_bucket",
        "lnarize_engine_load_seconds",
        "lnarize_in_flight_requests",
    ):
        assert name in text, name
    assert server.metric("lnarize_ready") == 1.0
    assert server.metric("lnarize_engine_load_seconds") > 0
    assert server.metric("lnarize_requests_total", {"route": "/v1/chat/completions", "status": "200"}) >= 1
    assert server.metric("lnarize_requests_total", {"route": "/v1/chat/completions", "status": "400"}) >= 1
    assert server.metric("vllm:generation_tokens_total") > 0


# Disconnects abort the engine request ----------------------------------------


# These tests time the server while it generates: their connections are
# opened first (server.connected_client), and each bound is far shorter than
# the generation it checks (1500 tokens take well over a minute here).


def wait_for_running(server, metrics: httpx.Client, predicate, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = server.metric("vllm:num_requests_running", client=metrics)
        if value is not None and predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"vllm:num_requests_running stayed at {value}")


LONG_GENERATION = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a very long essay about the history of Europe."}],
    "max_tokens": 1500,
    "temperature": 0,
    "ignore_eos": True,
}


def test_stream_disconnect_aborts_the_request(server):
    with server.connected_client(timeout=60, headers=auth()) as caller, server.connected_client() as metrics:
        with caller.stream("POST", CHAT, json={**LONG_GENERATION, "stream": True}) as response:
            assert response.status_code == 200
            received = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                if received >= 3:
                    break
            assert wait_for_running(server, metrics, lambda v: v >= 1, 30) >= 1
        # The connection is closed here.
        assert wait_for_running(server, metrics, lambda v: v == 0, 10) == 0


def test_non_stream_disconnect_aborts_the_request(server):
    with server.connected_client(timeout=3, headers=auth()) as caller, server.connected_client() as metrics:
        def give_up_early():
            try:
                caller.post(CHAT, json=LONG_GENERATION)
            except httpx.TimeoutException:
                pass  # the client hangs up

        calling = threading.Thread(target=give_up_early)
        calling.start()
        assert wait_for_running(server, metrics, lambda v: v >= 1, 30) >= 1
        calling.join()
        assert wait_for_running(server, metrics, lambda v: v == 0, 10) == 0


# Shutdown (ends the module's server: keep last) --------------------------------


def test_sigterm_drains_an_in_flight_stream_and_exits_0(server):
    body = {**LONG_GENERATION, "max_tokens": 400, "stream": True}
    with server.connected_client(timeout=120, headers=auth()) as caller, \
            server.connected_client(timeout=30, headers=auth()) as probe:
        with caller.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))

            # Frozen, the engine cannot finish the stream while the drain is probed.
            with server.frozen_engine():
                server.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 30
                while (ready := probe.get("/health/ready")).json().get("phase") != "draining" \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert ready.status_code == 503 and ready.json()["phase"] == "draining", ready.text
                # A second SIGTERM once draining (a wrapper forwarding what the
                # group also got) must not cut the drain.
                server.send_signal(signal.SIGTERM)
                refused = probe.post(CHAT, json={"model": MODEL, "messages": GOOD_MESSAGES})
                assert_openai_error(refused, 503, "ServiceUnavailableError")
                assert refused.headers["retry-after"].isdigit()
                assert probe.get("/health/live").status_code == 200

            finish_reason = None
            for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: "):]).get("choices", []):
                    finish_reason = choice.get("finish_reason") or finish_reason
    assert finish_reason == "length"  # completed, not aborted
    assert server.wait_exit(timeout=60) == 0
    assert "received SIGTERM again while draining: ignored" in server.log_path.read_text()
