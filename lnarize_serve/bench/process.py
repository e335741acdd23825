"""A server started as a subprocess and waited for: the one harness that
`bench compare`, the benchmark scripts and the end-to-end tests share.

The server runs in its own process group, so stopping it reaches the engine
processes it spawned too; its output goes to a log file whose last lines
explain a failed start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import psutil

LOCALHOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def without_lnarize_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment (default: this process's) with no LNARIZE_* variable,
    so a server started with it sees only the settings the caller adds."""
    source = os.environ if environ is None else environ
    return {key: value for key, value in source.items() if not key.upper().startswith("LNARIZE_")}


def metric_value(exposition: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of the samples of series ``name`` matching ``labels`` in a Prometheus
    text exposition (None if there is none)."""
    total = None
    for line in exposition.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
            continue
        total = (total or 0.0) + float(value)
    return total


class ServerProcess:
    """One server subprocess on ``127.0.0.1:port``, ready once ``ready_path`` answers 200."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API's base URL."""
        return f"{self.url}/v1"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() reaches the engine too
            )
        return self

    def state(self) -> str:
        if self.process is None:
            return "not started"
        code = self.process.poll()
        return "running" if code is None else f"exited with code {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(
        self,
        timeout_s: float,
        poll_s: float = 0.5,
        on_response: Callable[[httpx.Response, float], None] | None = None,
    ) -> float:
        """Poll the readiness path until it answers 200; returns the seconds waited.
        ``on_response`` sees every answer (and the seconds waited so far), the
        503s of the loading phases included."""
        assert self.process is not None, "start() first"
        started = time.monotonic()
        url = f"{self.url}{self.ready_path}"
        while (waited := time.monotonic() - started) < timeout_s:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail(30)}"
                )
            try:
                response = httpx.get(url, timeout=5)
            except httpx.TransportError:
                response = None
            if response is not None:
                if on_response is not None:
                    on_response(response, time.monotonic() - started)
                if response.status_code == 200:
                    return time.monotonic() - started
            time.sleep(poll_s)
        raise ServerStartError(f"{self.name} not ready after {waited:.0f} s; log {self.log_path}:\n{self.log_tail(30)}")

    def metric(self, name: str, labels: Mapping[str, str] | None = None, client: httpx.Client | None = None) -> float | None:
        """Sum of the samples of one series on /metrics matching ``labels`` (None if absent);
        read over ``client`` (its base URL this server's) when given, else a new connection."""
        response = client.get("/metrics") if client is not None else httpx.get(f"{self.url}/metrics", timeout=10)
        return metric_value(response.text, name, labels)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server and all its children so far."""
        if self.process is None:
            return 0.0
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for proc in processes:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def frontend_cpu_seconds(self) -> float:
        """CPU time of the HTTP/API process alone (the engine core runs in child processes).

        This is where a wrapper's cost lands; it moves far less than latency
        when other jobs share the machine (not zero: compare arms back to back).
        """
        if self.process is None:
            return 0.0
        try:
            times = psutil.Process(self.process.pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system

    def send_signal(self, sig: int) -> None:
        assert self.process is not None, "start() first"
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None, "start() first"
        return self.process.wait(timeout=timeout)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server (it drains and shuts its engine down), then
        SIGKILL to whatever is left of its process group after ``grace_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
