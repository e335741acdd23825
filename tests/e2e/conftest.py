"""Shared fixtures for end-to-end tests: one real server per module, real CPU engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server_process import ServerProcess


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The converted SmolLM2 folder (converted once per machine, then reused)."""
    from lnarize_serve.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="module")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


# Log lines of each server shown for a failed test in the run's last lines.
FAILURE_LOG_LINES = 25
_FAILED_SERVER_LOGS = pytest.StashKey[list]()
_SERVERS_AT_SETUP = pytest.StashKey[list]()
_STARTED_BEFORE_CALL = pytest.StashKey[int]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    started = ServerProcess.started
    if call.when == "setup":
        # Its servers: those its fixtures started or kept running (module scope).
        item.stash[_SERVERS_AT_SETUP] = [s for s in started if s.state() == "running"]
        item.stash[_STARTED_BEFORE_CALL] = len(started)
    if report.failed:
        servers = item.stash.get(_SERVERS_AT_SETUP, []) + started[item.stash.get(_STARTED_BEFORE_CALL, len(started)):]
        sections = [
            (f"server {server.url} ({server.state()}), last {FAILURE_LOG_LINES} log lines", server.log_tail(FAILURE_LOG_LINES))
            for server in servers
        ]
        report.sections.extend(sections)
        item.config.stash.setdefault(_FAILED_SERVER_LOGS, []).append((report.nodeid, sections))
    return report


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """What the servers of each failed end-to-end test logged, at the end of
    the run, where a CI log that keeps only its last lines still shows it."""
    failures = config.stash.get(_FAILED_SERVER_LOGS, [])
    if not failures:
        return
    terminalreporter.section("server logs of failed end-to-end tests")
    for nodeid, sections in failures:
        terminalreporter.write_line(f"--- {nodeid}")
        for title, text in sections:
            terminalreporter.write_line(f"[{title}]")
            terminalreporter.write_line(text)


def running_server(env: dict[str, str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(env, log_path).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
