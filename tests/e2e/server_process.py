"""Start `python -m lnarize_serve` as a real subprocess and talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# An engine start takes 30-90 s on an idle 2-core machine, minutes when it is shared.
READY_TIMEOUT_SECONDS = float(os.environ.get("LNARIZE_TEST_READY_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LNARIZE_")}
    env.update(
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "LNARIZE_HOST": "127.0.0.1",
            "LNARIZE_LOG_LEVEL": "info",
        }
    )
    env.update(settings)
    return env


class ServerProcess:
    # Every server started in this test process, so a failed test's report can
    # show what its servers logged (tests/e2e/conftest.py).
    started: list[ServerProcess] = []

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = dict(env, LNARIZE_PORT=str(self.port))
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.startup_ready_codes: list[int] = []

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lnarize_serve"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cleanup reaches the engine too
        )
        ServerProcess.started.append(self)
        return self

    def state(self) -> str:
        if self.process is None:
            return "not started"
        code = self.process.poll()
        return "running" if code is None else f"exited with code {code}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Poll /health/ready, recording every status seen until 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before ready:\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/health/ready", timeout=5)
                self.startup_ready_codes.append(response.status_code)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Sum of the samples of one series matching ``labels`` (None if absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = None
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            metric_name = series.split("{", 1)[0]
            if metric_name != name:
                continue
            if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
                continue
            total = (total or 0.0) + float(value)
        return total

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            # Whatever is left of the group (engine core, workers) goes too.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "_log", None):
            self._log.close()
