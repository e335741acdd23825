"""SIGTERM while the engine is still being built (e.g. a pod deleted during a
long model download): the server exits 0 promptly and leaves no engine
process behind. vLLM's engine build cannot be interrupted in-thread, so the
server terminates its engine processes itself."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.e2e.server_process import ServerProcess, base_env

pytestmark = pytest.mark.e2e


def test_sigterm_during_engine_build_exits_0_without_leftovers(demo_model_path, server_logs):
    server = ServerProcess(base_env(LNARIZE_PROFILE="cpu-demo"), server_logs / "sigterm-loading.log").start()
    try:
        # Wait until vLLM has spawned its engine process (the build is under way).
        deadline = time.monotonic() + 300
        descendants: list[psutil.Process] = []
        while time.monotonic() < deadline and server.process.poll() is None:
            descendants = psutil.Process(server.process.pid).children(recursive=True)
            if any(p.name().startswith("VLLM::EngineCor") for p in descendants):
                break
            time.sleep(0.2)
        assert any(p.name().startswith("VLLM::EngineCor") for p in descendants), server.log_tail()
        assert server.process.poll() is None, "the server must still be loading"

        server.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        assert server.wait_exit(timeout=30) == 0, server.log_tail()
        assert time.monotonic() - signalled_at < 30
        _, alive = psutil.wait_procs(descendants, timeout=5)
        assert not alive, f"engine processes left behind: {alive}"
    finally:
        server.stop()
