"""The shared server harness (lnarize_serve/bench/process.py) against a tiny
stand-in server: a real subprocess in its own process group, but one that
starts in a second instead of minutes, and that can be told to fail its start
or to leave a child behind. The real server runs under it in tests/e2e."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lnarize_serve.bench.process import ServerProcess, ServerStartError, free_port, metric_value, without_lnarize_settings

# Answers /health/ready with 503 twice, then 200; serves two samples of one
# series on /metrics; with "orphan", spawns a child that outlives it.
STAND_IN = textwrap.dedent('''
    import http.server, subprocess, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "fail":
        print("stand-in: bad settings", flush=True)
        sys.exit(2)
    if mode == "orphan":
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    answers = [503, 503]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health/ready":
                code, body = (answers.pop(0) if answers else 200), b"{}"
            else:
                code, body = 200, b'# HELP x\\nlnarize_requests_total{route="/a"} 2.0\\nlnarize_requests_total{route="/b"} 3.0\\n'
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    print("stand-in: listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


def stand_in(tmp_path: Path, mode: str = "ok") -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-c", STAND_IN, str(port), mode]
    return ServerProcess("stand-in", argv, without_lnarize_settings(), port, "/health/ready", tmp_path / "logs" / "s.log")


def test_waits_through_the_503s_and_reads_metrics(tmp_path):
    server = stand_in(tmp_path).start()
    seen = []
    try:
        waited = server.wait_ready(30, poll_s=0.05, on_response=lambda response, _: seen.append(response.status_code))
        assert seen == [503, 503, 200]
        assert 0 < waited < 30
        assert server.state() == "running"
        assert server.metric("lnarize_requests_total") == 5.0
        assert server.metric("lnarize_requests_total", {"route": "/b"}) == 3.0
        assert server.metric("lnarize_requests") is None
    finally:
        server.stop(grace_s=5)
    assert server.state().startswith("exited with code")
    assert "stand-in: listening" in server.log_tail()


def test_a_failed_start_says_so_with_the_log(tmp_path):
    server = stand_in(tmp_path, "fail").start()
    with pytest.raises(ServerStartError, match=r"(?s)stand-in exited with code 2 while starting.*bad settings"):
        server.wait_ready(30, poll_s=0.05)


def test_not_ready_in_time_is_an_error(tmp_path):
    server = ServerProcess("silent", [sys.executable, "-c", "import time; time.sleep(60)"], {}, free_port(),
                           "/health/ready", tmp_path / "silent.log")
    server.start()
    try:
        with pytest.raises(ServerStartError, match="silent not ready after"):
            server.wait_ready(0.5, poll_s=0.05)
    finally:
        server.stop(grace_s=5)


def test_stop_takes_the_whole_process_group(tmp_path):
    server = stand_in(tmp_path, "orphan").start()
    server.wait_ready(30, poll_s=0.05)
    children = psutil.Process(server.process.pid).children(recursive=True)
    assert children
    server.stop(grace_s=5)
    deadline = time.monotonic() + 10
    while any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children):
        assert time.monotonic() < deadline, "a child of the server outlived stop()"
        time.sleep(0.05)


def test_no_lnarize_setting_passes_through():
    env = without_lnarize_settings({"LNARIZE_MODEL": "m", "lnarize_port": "1", "PATH": "/bin", "VLLM_X": "1"})
    assert env == {"PATH": "/bin", "VLLM_X": "1"}


def test_metric_value_matches_the_name_exactly():
    text = "a_total 1\na_total_created 5\na_total{x=\"1\"} 2\n"
    assert metric_value(text, "a_total") == 3.0
    assert metric_value(text, "a_total", {"x": "1"}) == 2.0
