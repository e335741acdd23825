"""Measure the CPU demo's start-up: time to listen, engine build, time to ready,
and first-request latency (a benchmark script, not a test).

    .venv/bin/python benchmarks/serve_startup.py [--runs 2]

Starts `python -m lnarize_serve` with LNARIZE_PROFILE=cpu-demo and
VLLM_CPU_KVCACHE_SPACE=1 (demo model already converted), prints one table.
CPU figures; on a shared machine they include other processes' load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lnarize_serve.bench.process import ServerProcess, free_port, without_lnarize_settings
from lnarize_serve.demo_model import ensure_demo_model

MODEL = "smollm2-135m-instruct"
READY_TIMEOUT_SECONDS = 600


def gauge(server: ServerProcess, name: str) -> float:
    value = server.metric(name)
    return float("nan") if value is None else value


def measure_once() -> dict[str, float]:
    port = free_port()
    env = without_lnarize_settings()
    env.update(LNARIZE_PROFILE="cpu-demo", LNARIZE_HOST="127.0.0.1", LNARIZE_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1")
    log = Path(tempfile.mkdtemp(prefix="serve-startup-")) / "server.log"
    server = ServerProcess("lnarize-serve", [sys.executable, "-m", "lnarize_serve"], env, port, "/health/ready", log)
    url = server.url
    answered_after: list[float] = []
    server.start()
    try:
        # Seconds since the spawn, polled often: the first answer (any status)
        # is when it started listening.
        ready = server.wait_ready(READY_TIMEOUT_SECONDS, poll_s=0.05,
                                  on_response=lambda _response, waited: answered_after.append(waited))
        listening = answered_after[0]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 16}
        first_started = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        first_request = time.monotonic() - first_started
        response.raise_for_status()
        second_started = time.monotonic()
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).raise_for_status()
        second_request = time.monotonic() - second_started
        return {
            "listening_s": listening,
            "engine_build_s": gauge(server, "lnarize_engine_load_seconds"),
            "warmup_s": gauge(server, "lnarize_warmup_seconds"),
            "ready_s": ready,
            "first_request_s": first_request,
            "second_request_s": second_request,
            "completion_tokens": response.json()["usage"]["completion_tokens"],
        }
    finally:
        server.stop(grace_s=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    ensure_demo_model()
    rows = [measure_once() for _ in range(args.runs)]
    keys = list(rows[0])
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for index, row in enumerate(rows, 1):
        print(f"| {index} | " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    print(f"load average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
