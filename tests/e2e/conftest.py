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


def running_server(env: dict[str, str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(env, log_path).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
