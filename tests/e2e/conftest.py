"""Shared fixtures for end-to-end tests: one real server per module, real CPU engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
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


class StallRecorder:
    """A thread that notices when this test process was not run for a while
    (the machine stalled, not the server): a failed test's report says so."""

    TICK_S = 0.2
    STALL_S = 2.0

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (wall-clock start, seconds)
        threading.Thread(target=self._run, name="e2e-stall-recorder", daemon=True).start()

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(self.TICK_S)
            now = time.monotonic()
            if now - last - self.TICK_S >= self.STALL_S:
                self.stalls.append((time.time() - (now - last), now - last))
            last = now

    def since(self, wall_clock: float) -> str:
        found = [f"{datetime.fromtimestamp(start):%H:%M:%S} for {seconds:.1f} s" for start, seconds in self.stalls
                 if start >= wall_clock]
        return "; ".join(found) if found else "none"


_STALLS = StallRecorder()


def machine_state() -> str:
    lines = []
    for path in ("/proc/loadavg", "/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io"):
        try:
            lines.append(f"{path}: " + " | ".join(Path(path).read_text().split("\n")).strip(" |"))
        except OSError:
            pass
    return "\n".join(lines)
_FAILED_SERVER_LOGS = pytest.StashKey[list]()
_SERVERS_AT_SETUP = pytest.StashKey[list]()
_STARTED_BEFORE_CALL = pytest.StashKey[int]()
_SETUP_WALL_CLOCK = pytest.StashKey[float]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    started = ServerProcess.started
    if call.when == "setup":
        # Its servers: those its fixtures started or kept running (module scope).
        item.stash[_SERVERS_AT_SETUP] = [s for s in started if s.state() == "running"]
        item.stash[_STARTED_BEFORE_CALL] = len(started)
        item.stash[_SETUP_WALL_CLOCK] = time.time() - call.duration
    if report.failed:
        servers = item.stash.get(_SERVERS_AT_SETUP, []) + started[item.stash.get(_STARTED_BEFORE_CALL, len(started)):]
        sections = [
            (f"server {server.url} ({server.state()}), last {FAILURE_LOG_LINES} log lines", server.log_tail(FAILURE_LOG_LINES))
            for server in servers
        ]
        since = item.stash.get(_SETUP_WALL_CLOCK, time.time() - call.duration)
        sections.append((
            "this test process and the machine",
            f"times this test process was not run for >= {StallRecorder.STALL_S:.0f} s since the test's set-up: "
            f"{_STALLS.since(since)}\n{machine_state()}",
        ))
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
