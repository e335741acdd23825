"""Start `python -m lnarize_serve` as a real subprocess and talk to it over HTTP
(the package's own harness, lnarize_serve/bench/process.py, with test defaults)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar

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
