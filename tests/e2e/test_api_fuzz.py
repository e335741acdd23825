"""Property-based fuzzing of the public API against the real cpu-demo server.

Schemathesis draws request bodies from the OpenAPI schema of our app (the
routes are vLLM's own routers: chat, completions, models, plus our health
probes), both schema-valid ("positive") and schema-violating ("negative")
ones, and sends them with the API key to a real server subprocess. Every
answer must be a 2xx or a 4xx in OpenAI's error shape; no 5xx; the server
must still be ready afterwards.

The server does not serve /openapi.json (docs are off in production), so the
schema is built in this process from the same ``create_app`` the server runs.

Generation is kept tiny so a few hundred cases fit in a CI budget on 2 cores:
a short context (LNARIZE_MAX_MODEL_LEN) and each drawn body's token and
choice counts capped before it is sent (the caps are the only edits made to a
drawn case). Hypothesis runs derandomized, without an example database or
shrinking; every finding is printed with the body that caused it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis

from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env

pytestmark = pytest.mark.e2e

API_KEY = "sk-fuzz-test"
MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 256
MAX_TOKENS = 4
MAX_CHOICES = 2
REQUEST_TIMEOUT = 60

# (path, method, mode, examples): a few hundred cases in all.
PLAN = [
    ("/v1/chat/completions", "POST", "positive", 110),
    ("/v1/chat/completions", "POST", "negative", 70),
    ("/v1/completions", "POST", "positive", 80),
    ("/v1/completions", "POST", "negative", 40),
    ("/v1/models", "GET", "positive", 5),
    ("/health/ready", "GET", "positive", 3),
    ("/health/live", "GET", "positive", 3),
]
# Hand-shaped, mostly valid bodies per endpoint (see _plausible_strategies).
PLAUSIBLE_EXAMPLES = 80

# Body fields that set how much is generated; capped in every drawn dict body.
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")
CHOICE_FIELDS = ("n", "best_of")


@pytest.fixture(scope="module")
def server(demo_model_path, server_logs):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_API_KEY=API_KEY,
        LNARIZE_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
        LNARIZE_MAX_NUM_SEQS="4",
    )
    yield from running_server(env, server_logs / "fuzz-server.log")


@pytest.fixture(scope="module")
def api_schema():
    from lnarize_serve.app import create_app
    from lnarize_serve.settings import Settings

    app = create_app(Settings(profile="cpu-demo", api_key=API_KEY))
    return schemathesis.openapi.from_dict(app.openapi())


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def cap_generation(body: Any) -> Any:
    """Keep a drawn body's generation tiny; leave ill-typed values to the server."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for fields, cap in ((TOKEN_FIELDS, MAX_TOKENS), (CHOICE_FIELDS, MAX_CHOICES)):
        for field in fields:
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[field] = cap
    if body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    return body


def openai_error_problems(payload: Any, status: int | None) -> list[str]:
    """What is wrong with an error body, as OpenAI clients parse it (empty: fine)."""
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return [f"not {{'error': {{...}}}}: {str(payload)[:200]}"]
    error = payload["error"]
    problems = [f"missing {key!r}" for key in ("message", "type", "param", "code") if key not in error]
    if not isinstance(error.get("message"), str) or not error.get("message"):
        problems.append("message is not a non-empty string")
    if not isinstance(error.get("type"), str):
        problems.append("type is not a string")
    if status is not None and error.get("code") != status:
        problems.append(f"code {error.get('code')!r} != HTTP status {status}")
    if "Traceback" in str(error.get("message")):
        problems.append("message carries a traceback")
    return problems


def stream_error_events(text: str) -> list[Any]:
    """Error events inside an SSE body (``data: {"error": ...}``)."""
    events = []
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[len("data: ") :])
        except ValueError:
            events.append(line[:200])
            continue
        if isinstance(event, dict) and "error" in event:
            events.append(event)
    return events


def judge(status: int, content_type: str, text: str) -> list[str]:
    """Problems with one answer (empty: acceptable)."""
    if status >= 500:
        return [f"HTTP {status}: {text[:300]}"]
    if 400 <= status < 500:
        try:
            payload = json.loads(text)
        except ValueError:
            return [f"HTTP {status} body is not JSON: {text[:200]}"]
        return [f"HTTP {status} {p}" for p in openai_error_problems(payload, status)]
    if "text/event-stream" in content_type:
        problems = []
        for event in stream_error_events(text):
            # An error after the stream started: fine if OpenAI-shaped, but a
            # 5xx-class one is a server fault all the same.
            shape = openai_error_problems(event, None)
            code = event["error"].get("code") if isinstance(event, dict) and isinstance(event["error"], dict) else None
            if shape or (isinstance(code, int) and code >= 500):
                problems.append(f"stream error event {str(event)[:300]} {shape}")
        return problems
    return []


# Plausible bodies -------------------------------------------------------------
# The schema's bodies are mostly rejected before the engine (it does not say
# that messages must be non-empty, which model is served, ...). These bodies
# are close to what clients send, with values at and beyond every boundary, so
# the fuzzer also reaches the tokenizer, the sampler and structured output.

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _plausible_strategies():
    from hypothesis import strategies as st

    text = st.text(max_size=40)
    number = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, 2.0001, 100.0]),
    )
    integer = st.one_of(st.integers(), st.sampled_from([-1, 0, 1, 2, 20, 21, MAX_MODEL_LEN, 2**31, 2**63]))
    role = st.one_of(st.sampled_from(KNOWN_ROLES), text)
    message = st.fixed_dictionaries(
        {"role": role},
        optional={"content": st.one_of(text, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2)), "name": text},
    )
    small_schema = st.sampled_from(
        [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"type": "string", "pattern": "[a-z]{1,3}"},
            {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
            {"type": "nonsense"},
            {"$ref": "#/nowhere"},
            {},
        ]
    )
    response_format = st.one_of(
        st.just({"type": "text"}),
        st.just({"type": "json_object"}),
        small_schema.map(lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        st.fixed_dictionaries({"type": text}),
    )
    sampling = {
        "temperature": number,
        "top_p": number,
        "top_k": integer,
        "min_p": number,
        "presence_penalty": number,
        "frequency_penalty": number,
        "repetition_penalty": number,
        "seed": integer,
        "n": integer,
        "logprobs": st.booleans(),
        "top_logprobs": integer,
        "stop": st.one_of(text, st.lists(text, max_size=5)),
        "stream": st.booleans(),
        "ignore_eos": st.booleans(),
        "max_tokens": integer,
        "min_tokens": integer,
        "logit_bias": st.dictionaries(st.one_of(st.integers(-1, 60000).map(str), text), number, max_size=3),
        "user": text,
    }
    chat = st.fixed_dictionaries(
        {"model": st.just(MODEL), "messages": st.lists(message, min_size=1, max_size=3)},
        optional={
            **sampling,
            "response_format": response_format,
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "max_completion_tokens": integer,
        },
    )
    completion = st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": st.one_of(text, st.lists(st.integers(-5, 60000), min_size=1, max_size=8), st.lists(text, min_size=1, max_size=3))},
        optional={**sampling, "echo": st.booleans(), "suffix": text, "logprobs": integer},
    )
    return {"/v1/chat/completions": chat, "/v1/completions": completion}


# The fuzz run (once per module; the tests below judge its records) ------------


class FuzzRun:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, Any, int, str, str]] = []  # (plan, path, body, status, content type, text)
        self.no_answer: list[str] = []
        self.elapsed = 0.0

    @property
    def statuses(self) -> Counter[int]:
        return Counter(record[3] for record in self.records)


def body_text(body: Any) -> str:
    return repr(body[:200]) if isinstance(body, bytes) else json.dumps(body, default=repr)[:600]


@pytest.fixture(scope="module")
def fuzz_run(server, api_schema) -> FuzzRun:
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    run = FuzzRun()
    session = requests.Session()
    started = time.monotonic()
    hypothesis_settings = settings(
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    def record(plan: str, path: str, body: Any, status: int, content_type: str, text: str) -> None:
        run.records.append((plan, path, body, status, content_type, text))

    for path, method, mode, examples in PLAN:
        operation = api_schema[path][method]

        @settings(hypothesis_settings, max_examples=examples)
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def send_case(case):
            case.body = cap_generation(case.body)
            try:
                response = case.call(base_url=server.url, session=session, headers=auth(), timeout=REQUEST_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, not a fuzzer crash
                run.no_answer.append(f"{method} {path} {body_text(case.body)} -> {exc!r}")
                return
            # Schemathesis' response headers: lowercase keys, list values.
            content_type = (response.headers.get("content-type") or [""])[0]
            record(f"schema-{mode}", path, case.body, response.status_code, content_type, response.text)

        send_case()

    for path, strategy in _plausible_strategies().items():

        @settings(hypothesis_settings, max_examples=PLAUSIBLE_EXAMPLES)
        @given(body=strategy)
        def send_body(body):
            body = cap_generation(body)
            # Python's encoder writes NaN/Infinity literals as most clients would not: fuzz them too.
            content = json.dumps(body).encode()
            headers = {**auth(), "content-type": "application/json"}
            try:
                response = session.post(f"{server.url}{path}", data=content, headers=headers, timeout=REQUEST_TIMEOUT)
            except Exception as exc:  # noqa: BLE001
                run.no_answer.append(f"POST {path} {body_text(body)} -> {exc!r}")
                return
            record("plausible", path, body, response.status_code, response.headers.get("content-type", ""), response.text)

        send_body()

    run.elapsed = time.monotonic() - started
    print(f"\nfuzz: {len(run.records)} cases in {run.elapsed:.0f} s, statuses {dict(sorted(run.statuses.items()))}")
    for plan in sorted({record[0] for record in run.records}):
        counts = Counter(record[3] for record in run.records if record[0] == plan)
        print(f"  {plan}: {dict(sorted(counts.items()))}")
    return run


def print_findings(title: str, findings: list[str]) -> None:
    print(f"\n{title}: {len(findings)} findings")
    for finding in findings[:30]:
        print(f"FINDING {finding[:400]}")


# Checks ------------------------------------------------------------------------


def test_every_fuzzed_request_is_answered_with_2xx_or_an_openai_shaped_4xx(server, fuzz_run):
    findings = list(fuzz_run.no_answer)
    for plan, path, body, status, content_type, text in fuzz_run.records:
        findings.extend(f"[{plan}] POST {path} {body_text(body)}\n    -> {p}" for p in judge(status, content_type, text))
    print_findings("answers", findings)
    assert len(fuzz_run.records) >= 400
    assert not findings, "\n".join(findings[:20])


def test_server_is_ready_after_the_fuzz_run(server, fuzz_run):
    ready = httpx.get(f"{server.url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert server.metric("vllm:num_requests_running") == 0


def test_the_schema_is_not_served(server):
    # Docs are off in production; the 404 speaks OpenAI's dialect too.
    response = httpx.get(f"{server.url}/openapi.json", headers=auth(), timeout=10)
    assert response.status_code == 404
    assert not openai_error_problems(response.json(), 404)


# Findings the server does not handle yet: precise checks, expected to fail
# until the request checks land (non-strict: they pass once it does).

# Fragments of Python's own exception texts: internals, not a message for a client.
PYTHON_ERROR_TEXTS = ("object is not subscriptable", "object has no attribute", "NoneType", "object is not iterable", "unhashable type")


def chat_roles(body: Any) -> list[Any]:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return []
    return [m.get("role") for m in body["messages"] if isinstance(m, dict)]


def test_unknown_message_roles_are_refused(server, fuzz_run):
    body = {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=REQUEST_TIMEOUT)
    accepted = [
        body_text(body)
        for plan, path, body, status, _, _ in fuzz_run.records
        if path == "/v1/chat/completions" and status == 200 and any(role not in KNOWN_ROLES for role in chat_roles(body))
    ]
    print_findings("unknown roles accepted by the fuzz run", accepted)
    assert response.status_code == 400, response.text[:300]
    assert not openai_error_problems(response.json(), 400)
    assert not accepted


def test_huge_n_is_refused(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 1000, "stream": True}
    # Streamed: an accepted request answers 200 at once, and closing it aborts the work.
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=REQUEST_TIMEOUT) as response:
        status = response.status_code
        payload = response.read() if status != 200 else b""
    assert status == 400
    assert not openai_error_problems(json.loads(payload), 400)


def test_4xx_messages_carry_no_python_exception_text(server, fuzz_run):
    body = {"model": MODEL, "messages": [{"author": {"role": "user"}}], "max_tokens": 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth(), timeout=REQUEST_TIMEOUT)
    leaks = [
        f"[{plan}] {body_text(body)} -> {text[:200]}"
        for plan, path, body, status, _, text in fuzz_run.records
        if 400 <= status < 500 and any(fragment in text for fragment in PYTHON_ERROR_TEXTS)
    ]
    print_findings("4xx messages with Python exception text", leaks)
    assert response.status_code == 400
    assert not any(fragment in response.text for fragment in PYTHON_ERROR_TEXTS), response.text
    assert not leaks
