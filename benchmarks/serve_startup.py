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
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from lnarize_serve.demo_model import ensure_demo_model

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def measure_once() -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LNARIZE_")}
    env.update(LNARIZE_PROFILE="cpu-demo", LNARIZE_HOST="127.0.0.1", LNARIZE_PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1")
    log = tempfile.NamedTemporaryFile(prefix="serve-startup-", suffix=".log", delete=False)  # noqa: SIM115
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "lnarize_serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    listening = ready = None
    try:
        while ready is None:
            if process.poll() is not None:
                raise RuntimeError(f"server exited early; log: {log.name}")
            try:
                code = httpx.get(f"{url}/health/ready", timeout=2).status_code
                listening = listening or time.monotonic() - started
                if code == 200:
                    ready = time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
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
            "engine_build_s": metric(url, "lnarize_engine_load_seconds"),
            "warmup_s": metric(url, "lnarize_warmup_seconds"),
            "ready_s": ready,
            "first_request_s": first_request,
            "second_request_s": second_request,
            "completion_tokens": response.json()["usage"]["completion_tokens"],
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


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
