"""The HTTP app before and around the engine: probes, admission, auth, limits, errors, metrics.

These tests never build a real engine: the engine starter either blocks (the
app is genuinely in its loading phase, as during a real 30 s load) or raises
(an engine that cannot be built). Everything past loading is covered end to
end on the real CPU engine in tests/e2e.
"""

import threading

import pytest
from fastapi.testclient import TestClient

from lnarize_serve.app import create_app
from lnarize_serve.lifecycle import Phase
from lnarize_serve.runtime import EXIT_ENGINE_FAILED_TO_START
from lnarize_serve.serving import OPENAI_ROUTES
from lnarize_serve.settings import load_settings


@pytest.fixture(autouse=True)
def demo_profile(clean_env, monkeypatch):
    # Demo profile: resolving the model is then local (no hub access).
    monkeypatch.setenv("LNARIZE_PROFILE", "cpu-demo")


class BlockingStarter:
    """Holds the app in its loading phase until released."""

    def __init__(self):
        self.release = threading.Event()

    def __call__(self, engine_args):
        self.release.wait(timeout=60)
        raise RuntimeError("released by the test")


@pytest.fixture
def loading_app(monkeypatch):
    # Skip the demo model conversion: the starter never uses the location.
    monkeypatch.setattr("lnarize_serve.engine.resolve_model_location", lambda settings: "/nonexistent/model")

    def make(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        starter = BlockingStarter()
        app = create_app(load_settings(), engine_starter=starter)
        return app, starter

    return make


@pytest.fixture
def client_of():
    opened = []

    def open_client(app, starter):
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append((client, starter))
        return client

    yield open_client
    for client, starter in opened:
        starter.release.set()
        client.__exit__(None, None, None)


def test_probes_while_loading(loading_app, client_of):
    app, starter = loading_app()
    client = client_of(app, starter)
    live = client.get("/health/live")
    assert live.status_code == 200 and live.json()["status"] == "alive"
    for path in ("/health/ready", "/health"):
        ready = client.get(path)
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert ready.json()["phase"] == "loading"
        assert ready.headers["retry-after"].isdigit()


def test_api_is_503_with_retry_after_while_loading(loading_app, client_of):
    app, starter = loading_app()
    client = client_of(app, starter)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        response = client.request(method, path, json={"model": "x", "messages": []})
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        error = response.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
        assert "loading" in error["message"]


def test_api_key_guards_v1_only(loading_app, client_of):
    app, starter = loading_app(LNARIZE_API_KEY="sk-test")
    client = client_of(app, starter)
    missing = client.get("/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "AuthenticationError"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "sk-test" not in wrong.text
    # With the right key the request passes auth and meets the readiness gate.
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 503
    assert client.get("/v1/models", headers={"Authorization": "bearer sk-test"}).status_code == 503
    assert client.get("/v1/models", headers={"Authorization": "BEARER sk-test"}).status_code == 503
    assert client.get("/v1/models", headers={"Authorization": "Basic sk-test"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "bearer SK-TEST"}).status_code == 401
    assert client.get("/health/live").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_body_over_the_limit_is_413(loading_app, client_of):
    app, starter = loading_app(LNARIZE_MAX_REQUEST_BYTES="2048")
    client = client_of(app, starter)
    big = b'{"model": "x", "prompt": "' + b"a" * 4096 + b'"}'
    declared = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["error"]["type"] == "RequestTooLargeError"

    def chunks():  # no Content-Length: the limit is enforced by counting
        for _ in range(8):
            yield b"a" * 512

    streamed = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_unknown_route_is_openai_shaped_404(loading_app, client_of):
    app, starter = loading_app()
    client = client_of(app, starter)
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "NotFoundError"


def test_unexpected_errors_leak_nothing(loading_app, client_of):
    app, starter = loading_app()

    async def explode():
        raise RuntimeError("secret detail at /srv/internal/path.py")

    app.add_api_route("/explode", explode)
    client = client_of(app, starter)
    response = client.get("/explode")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "InternalServerError"
    assert "secret" not in response.text and "/srv" not in response.text
    assert "error_id=" in error["message"]


@pytest.mark.parametrize(
    "peek",
    [
        # `"messages": false` iterated before pydantic checks its type: TypeError
        lambda data: [m for m in data["messages"]],
        # `"structured_outputs": true` read as a dict: AttributeError
        lambda data: data.get("structured_outputs", {}).get("choice"),
    ],
    ids=["TypeError", "AttributeError"],
)
def test_a_body_validator_that_trips_over_the_wrong_type_is_400(loading_app, client_of, peek):
    # vLLM's request models have validators that look inside fields before
    # pydantic checks their types, and raise whatever that raises (found by
    # the API fuzzer as 500s). A stand-in model does the same.
    from pydantic import BaseModel, model_validator

    class Body(BaseModel):
        messages: list[dict]
        structured_outputs: dict | None = None

        @model_validator(mode="before")
        @classmethod
        def look_inside(cls, data):
            peek(data)
            return data

    app, starter = loading_app()

    async def chat(body: Body):
        return {"ok": True}

    app.add_api_route("/chat", chat, methods=["POST"])
    client = client_of(app, starter)
    response = client.post("/chat", json={"messages": False, "structured_outputs": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and "not iterable" not in error["message"]
    assert client.post("/chat", json={"messages": [{"role": "user"}]}).status_code == 200


@pytest.mark.parametrize("exc_class", [ValueError, TypeError])
def test_server_bugs_are_500_with_an_error_id_not_400(loading_app, client_of, caplog, exc_class):
    app, starter = loading_app()

    async def buggy():
        raise exc_class("server-side bug in /srv/internal/code.py")

    app.add_api_route("/buggy", buggy)
    client = client_of(app, starter)
    with caplog.at_level("ERROR", logger="lnarize_serve.errors"):
        response = client.get("/buggy")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "InternalServerError" and error["code"] == 500
    assert "/srv" not in response.text
    error_id = error["message"].split("error_id=")[1].rstrip(".")
    (record,) = [r for r in caplog.records if f"error_id={error_id}" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is exc_class


def test_a_request_that_meets_a_dead_engine_is_503_without_a_traceback(loading_app, client_of, caplog):
    # A fake raise: the real engine's death is driven end to end in
    # tests/e2e/test_cut_streams.py, where streams are already open; this is the
    # non-streaming request whose handler sees vLLM's EngineDeadError itself.
    from vllm.v1.engine.exceptions import EngineDeadError

    app, starter = loading_app()

    async def dead():
        raise EngineDeadError()

    app.add_api_route("/dead", dead)
    client = client_of(app, starter)
    with caplog.at_level("WARNING", logger="lnarize_serve.errors"):
        response = client.get("/dead")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
    assert all(record.exc_info is None for record in caplog.records)
    assert any("engine dead" in record.getMessage() for record in caplog.records)


def test_vllm_request_validation_errors_stay_400(loading_app, client_of):
    from vllm.exceptions import VLLMValidationError

    app, starter = loading_app()

    async def invalid():
        raise VLLMValidationError("temperature must be >= 0", parameter="temperature", value=-1)

    app.add_api_route("/invalid", invalid)
    client = client_of(app, starter)
    response = client.get("/invalid")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["param"] == "temperature"


def test_access_log_line_and_request_id(loading_app, client_of, caplog):
    app, starter = loading_app()
    client = client_of(app, starter)
    with caplog.at_level("INFO", logger="lnarize_serve.access"):
        sent = client.post("/v1/completions?secret=q", json={"prompt": "body-secret"}, headers={"X-Request-Id": "client-id-1"})
        generated = client.get("/health/live")
        forged = client.get("/health/live", headers={"X-Request-Id": "a" * 200})
    assert sent.headers["x-request-id"] == "client-id-1"
    assert len(generated.headers["x-request-id"]) == 32
    assert forged.headers["x-request-id"] != "a" * 200
    lines = [r.getMessage() for r in caplog.records if r.name == "lnarize_serve.access"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("POST /v1/completions 503 ")
    assert lines[0].endswith(" request_id=client-id-1")
    assert "body-secret" not in lines[0] and "secret=q" not in lines[0]
    assert lines[1].startswith("GET /health/live 200 ") and generated.headers["x-request-id"] in lines[1]
    duration = lines[1].split()[3]
    assert duration.endswith("ms") and float(duration[:-2]) >= 0


def test_metrics_while_loading(loading_app, client_of):
    app, starter = loading_app()
    client = client_of(app, starter)
    client.get("/health/ready")
    text = client.get("/metrics").text
    assert "lnarize_ready 0.0" in text
    assert 'lnarize_phase{phase="loading"} 1.0' in text
    assert "lnarize_build_info{" in text
    assert 'lnarize_settings_info{' in text and 'profile="cpu-demo"' in text
    assert 'lnarize_requests_total{route="/health/ready",status="503"}' in text
    assert "lnarize_engine_load_seconds 0.0" in text


def test_request_metrics_label_each_route_the_app_serves_and_lump_the_rest(loading_app, client_of):
    app, starter = loading_app()
    client = client_of(app, starter)
    assert app.state.metrics.routes == {"/health", "/health/live", "/health/ready", "/metrics", *OPENAI_ROUTES}
    client.get("/v1/models")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'lnarize_requests_total{route="/v1/models",status="503"}' in text
    assert 'lnarize_requests_total{route="other",status="404"}' in text
    assert "/no/such/path" not in text


def test_engine_that_cannot_be_built_fails_liveness(monkeypatch):
    monkeypatch.setattr("lnarize_serve.engine.resolve_model_location", lambda settings: "/nonexistent/model")

    def broken_starter(engine_args):
        raise RuntimeError("no such model")

    app = create_app(load_settings(), engine_starter=broken_starter)
    with TestClient(app) as client:
        for _ in range(100):
            if app.state.lifecycle.phase is Phase.FAILED:
                break
            threading.Event().wait(0.05)
        assert app.state.lifecycle.phase is Phase.FAILED
        assert client.get("/health/live").status_code == 503
        assert client.get("/health/ready").json()["phase"] == "failed"
    assert app.state.runtime.exit_code == EXIT_ENGINE_FAILED_TO_START


def test_stopping_while_the_engine_builds_leaves_the_process_alone(loading_app):
    # Only `lnarize-serve serve` installs the hard-exit hook; an app embedded
    # elsewhere (here: the test process) must survive a shutdown mid-build.
    app, starter = loading_app()
    client = TestClient(app)
    client.__enter__()
    for _ in range(200):
        if app.state.runtime.engine_build_in_progress:
            break
        threading.Event().wait(0.05)
    assert app.state.runtime.engine_build_in_progress
    threading.Timer(0.5, starter.release.set).start()
    client.__exit__(None, None, None)
    assert app.state.runtime.on_stop_during_engine_build is None
    assert not app.state.runtime.engine_build_in_progress
