"""Bounded load with faults against the CPU demo: concurrent streaming clients,
some hanging up mid-stream, rounds of T seconds, then a SIGTERM in the middle
of a last round (a benchmark script; tests/e2e/test_load_faults.py runs the
same rounds with assertions).

    .venv/bin/python benchmarks/load_faults.py [--clients 8] [--seconds 20] [--rounds 3]

Starts `python -m lnarize_serve` (cpu-demo profile, loopback only), prints one
table: per round, requests sent / completed / aborted by the client / refused
with 503 / errors / lost, vllm:num_requests_running after the round and the
API server's RSS. "lost" is a request that got a response and ended with
neither a complete stream, our own hang-up, a 503 refusal nor an error event.
"unanswered" is one whose connection was reset before any response: at
shutdown, connections still waiting in the kernel's accept queue when the
server closes its listening socket are reset by the kernel (TCP's own race;
the server never saw them, which the test checks against the server's access
log); in a plain round it counts as a failure.
CPU figures; on a shared machine they include other processes' load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from lnarize_serve.bench.process import ServerProcess, ServerStartError, free_port, metric_value, without_lnarize_settings

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step.",
    "List facts about the planets of the solar system.",
    "Describe a walk through a forest in autumn.",
]
OUTCOMES = ("completed", "client_abort", "refused_503", "error", "lost", "unanswered", "not_connected")


@dataclasses.dataclass
class LoadConfig:
    clients: int = 8
    seconds: float = 20.0
    disconnect_fraction: float = 0.25
    # Tokens per stream: ignore_eos makes every stream this long, so a
    # hang-up after a few events really is mid-stream.
    min_tokens: int = 16
    max_tokens: int = 48
    # Our hang-up comes after this many SSE events.
    disconnect_after_events: int = 3
    seed: int = 0


@dataclasses.dataclass
class RoundResult:
    name: str
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    details: list[str] = dataclasses.field(default_factory=list)  # errors and lost requests, one line each
    running_after: float | None = None
    rss_mib: float | None = None
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.outcomes[o] for o in OUTCOMES if o != "not_connected")

    @property
    def answered(self) -> int:
        """Requests that got a response: each is one line in the server's access log."""
        return self.sent - self.outcomes["unanswered"]


def is_openai_error(payload: object) -> bool:
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return False
    return {"message", "type", "param", "code"} <= set(payload["error"])


async def one_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict, hang_up_after: int | None) -> tuple[str, str]:
    """One streaming chat request; returns (outcome, detail)."""
    events = 0
    finish_reason = None
    answered = False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            answered = True
            if response.status_code == 503:
                payload = json.loads(await response.aread())
                return ("refused_503", "") if is_openai_error(payload) else ("error", f"503 not OpenAI-shaped: {payload}")
            if response.status_code != 200:
                return "error", f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    if finish_reason in ("stop", "length"):
                        return "completed", ""
                    return "error", f"stream done with finish_reason {finish_reason!r}"
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    return "error", f"error event: {str(event)[:200]}"
                events += 1
                for choice in event.get("choices", []):
                    finish_reason = choice.get("finish_reason") or finish_reason
                if hang_up_after is not None and events >= hang_up_after:
                    return "client_abort", ""  # leaving the block closes the connection
            return "lost", f"stream ended without [DONE] after {events} events (finish_reason {finish_reason!r})"
    except httpx.ConnectError:
        return "not_connected", ""  # the listener is gone (after SIGTERM): nothing was sent
    except httpx.TransportError as exc:
        if not answered:
            return "unanswered", f"{type(exc).__name__} before any response: {exc}"
        return "lost", f"{type(exc).__name__} after {events} events: {exc}"


async def client_loop(index: int, url: str, headers: dict[str, str], config: LoadConfig, deadline: float, result: RoundResult, rng: random.Random) -> None:
    # One connection per request: a keep-alive connection closed by the server
    # between two requests would look like a lost request.
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while time.monotonic() < deadline:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": rng.randint(config.min_tokens, config.max_tokens),
                "ignore_eos": True,
                "temperature": 0.7,
                "stream": True,
            }
            hang_up = config.disconnect_after_events if rng.random() < config.disconnect_fraction else None
            outcome, detail = await one_stream(client, url, headers, body, hang_up)
            result.outcomes[outcome] += 1
            if detail:
                result.details.append(f"client {index}: {outcome}: {detail}")
            if outcome == "not_connected":
                return  # the server is gone; this client is done
            if outcome == "refused_503":
                await asyncio.sleep(0.2)


def wait_idle(url: str, timeout: float = 10.0) -> float | None:
    """vllm:num_requests_running once it is 0, or its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = metric_value(httpx.get(f"{url}/metrics", timeout=10).text, "vllm:num_requests_running")
        if value == 0:
            return value
        time.sleep(0.1)
    return value


def access_log_posts(log: Path) -> int:
    """Chat requests the server answered, from its access log (one line each)."""
    return sum(" lnarize_serve.access: POST /v1/chat/completions " in line for line in log.read_text(errors="replace").splitlines())


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def run_round(name: str, url: str, api_key: str | None, config: LoadConfig, seed: int, sigterm_pid: int | None = None) -> RoundResult:
    """``config.clients`` clients for ``config.seconds``; with ``sigterm_pid``, that
    process gets SIGTERM halfway through and the clients run until it is gone."""
    result = RoundResult(name)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    deadline = started + config.seconds
    tasks = [
        asyncio.create_task(client_loop(i, url, headers, config, deadline, result, random.Random(seed * 1000 + i)))
        for i in range(config.clients)
    ]
    if sigterm_pid is not None:
        await asyncio.sleep(config.seconds / 2)
        os.kill(sigterm_pid, signal.SIGTERM)
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - started
    return result


def print_table(rounds: list[RoundResult]) -> None:
    header = f"{'round':<14}{'sent':>6}{'completed':>11}{'client abort':>14}{'refused 503':>13}{'errors':>8}{'lost':>6}{'unanswered':>12}{'running after':>15}{'RSS MiB':>9}{'s':>6}"
    print(header)
    print("-" * len(header))
    for r in rounds:
        running = "-" if r.running_after is None else f"{r.running_after:g}"
        rss = "-" if r.rss_mib is None else f"{r.rss_mib:.0f}"
        o = r.outcomes
        print(f"{r.name:<14}{r.sent:>6}{o['completed']:>11}{o['client_abort']:>14}{o['refused_503']:>13}{o['error']:>8}{o['lost']:>6}{o['unanswered']:>12}{running:>15}{rss:>9}{r.seconds:>6.0f}")
    for r in rounds:
        for detail in r.details[:10]:
            print(f"  {r.name}: {detail}")


def run_all(url: str, process: subprocess.Popen, api_key: str | None, config: LoadConfig, rounds: int, exit_timeout: float) -> tuple[list[RoundResult], int | None]:
    """``rounds`` plain rounds, then one with a SIGTERM halfway; returns the results and the exit code."""
    pid = process.pid
    results = []
    for i in range(1, rounds + 1):
        result = asyncio.run(run_round(f"round {i}", url, api_key, config, seed=config.seed + i))
        result.running_after = wait_idle(url)
        result.rss_mib = rss_mib(pid)
        results.append(result)
    last = asyncio.run(run_round("SIGTERM round", url, api_key, config, seed=config.seed + rounds + 1, sigterm_pid=pid))
    results.append(last)
    try:
        return results, process.wait(timeout=exit_timeout)
    except subprocess.TimeoutExpired:
        return results, None


def main() -> int:
    from lnarize_serve.demo_model import ensure_demo_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disconnect-fraction", type=float, default=0.25)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    args = parser.parse_args()
    config = LoadConfig(clients=args.clients, seconds=args.seconds, disconnect_fraction=args.disconnect_fraction)

    ensure_demo_model()
    port = free_port()
    drain_timeout = 30.0
    env = without_lnarize_settings()
    env.update(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_HOST="127.0.0.1",
        LNARIZE_PORT=str(port),
        LNARIZE_MAX_MODEL_LEN="512",
        LNARIZE_MAX_NUM_SEQS=str(args.max_num_seqs),
        LNARIZE_DRAIN_TIMEOUT=str(drain_timeout),
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    log = Path(tempfile.mkdtemp(prefix="load-faults-")) / "server.log"
    server = ServerProcess("lnarize-serve", [sys.executable, "-m", "lnarize_serve"], env, port, "/health/ready", log)
    try:
        server.start().wait_ready(600)
        results, exit_code = run_all(server.url, server.process, None, config, args.rounds, drain_timeout + 30)
    except ServerStartError as exc:
        print(exc)
        return 1
    finally:
        server.stop(grace_s=0)
    print(f"{config.clients} streaming clients, {config.seconds:g} s a round, {config.disconnect_fraction:.0%} hang up after {config.disconnect_after_events} events; max_num_seqs {args.max_num_seqs}")
    print_table(results)
    print(f"exit code after SIGTERM: {exit_code}; server log: {log}")
    lost = sum(r.outcomes["lost"] for r in results)
    unanswered_in_plain_rounds = sum(r.outcomes["unanswered"] for r in results[:-1])
    answered_logged = access_log_posts(log) == sum(r.answered for r in results)
    return 0 if exit_code == 0 and lost == 0 and unanswered_in_plain_rounds == 0 and answered_logged else 1


if __name__ == "__main__":
    sys.exit(main())
