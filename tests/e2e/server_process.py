"""Start `python -m lnarize_serve` as a real subprocess and talk to it over HTTP
(the package's own harness, lnarize_serve/bench/process.py, with test defaults)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import psutil

from lnarize_serve.bench import process
from lnarize_serve.bench.process import free_port, without_lnarize_settings

# An engine start takes 30-90 s on an idle 2-core machine, minutes when it is shared.
READY_TIMEOUT_SECONDS = float(os.environ.get("LNARIZE_TEST_READY_TIMEOUT", "600"))


def base_env(**settings: str) -> dict[str, str]:
    env = without_lnarize_settings()
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "LNARIZE_HOST": "127.0.0.1",
            "LNARIZE_LOG_LEVEL": "info",
        }
    )
    env.update(settings)
    return env


class ServerProcess(process.ServerProcess):
    # Every server started in this test process, so a failed test's report can
    # show what its servers logged (tests/e2e/conftest.py).
    started: ClassVar[list[ServerProcess]] = []

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        port = free_port()
        super().__init__("lnarize-serve", [sys.executable, "-m", "lnarize_serve"], dict(env, LNARIZE_PORT=str(port)),
                         port, "/health/ready", log_path)
        # Every readiness status seen until 200 (503 while loading, then 200).
        self.startup_ready_codes: list[int] = []

    def start(self) -> ServerProcess:
        super().start()
        ServerProcess.started.append(self)
        return self

    def log_tail(self, lines: int = 60) -> str:
        return super().log_tail(lines)

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> float:
        return super().wait_ready(timeout, on_response=lambda response, _: self.startup_ready_codes.append(response.status_code))

    @contextlib.contextmanager
    def connected_client(self, timeout: float = 30, **kwargs) -> Iterator[httpx.Client]:
        """An httpx client whose connection is opened now, with one liveness probe.

        Used by tests that time what the server does while it generates: a
        request sent on this client soon after (within uvicorn's 5 s keep-alive)
        needs no new connection, so the test measures the server, not how long
        a connect takes on a machine busy generating.
        """
        with httpx.Client(base_url=self.url, timeout=timeout, **kwargs) as client:
            client.get("/health/live").raise_for_status()
            yield client

    @contextlib.contextmanager
    def frozen_engine(self) -> Iterator[None]:
        """The engine processes stopped (SIGSTOP) while the API process goes on
        serving: a request in flight stays in flight, however long the test
        takes to probe the server, until the block ends (SIGCONT)."""
        assert self.process is not None, "start() first"
        engine = psutil.Process(self.process.pid).children(recursive=True)
        for engine_process in engine:
            engine_process.suspend()
        try:
            yield
        finally:
            for engine_process in engine:
                with contextlib.suppress(psutil.Error):
                    engine_process.resume()
