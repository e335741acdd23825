"""The container's start path, run for real on the CPU demo (no Docker engine needed).

entrypoint.sh (GPU check skipped, as documented for CPU use) execs the real
server; the Dockerfile's own HEALTHCHECK command reports not-ready while the
engine loads and ready afterwards; the official openai client gets an answer;
SIGTERM to the process Docker would signal drains and exits 0. The token file
never shows up in the logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from lnarize_serve.bench.process import free_port

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_containerStartToken9876543210"
LISTEN_TIMEOUT_S = 240
READY_TIMEOUT_S = 420


def dockerfile_healthcheck_command() -> list[str]:
    """The HEALTHCHECK CMD array exactly as the Dockerfile has it (continuation lines joined)."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])\s*$", text, re.M)
    command = json.loads(match.group(1))
    assert command[0] == "python3"
    return [sys.executable, *command[1:]]


def serve_md_examples(port: int) -> list[tuple[list[str], str]]:
    """SERVE.md's curl and Python examples, pointed at this server (commands, label)."""
    text = (REPO_ROOT / "SERVE.md").read_text().replace("localhost:9000", f"127.0.0.1:{port}")
    examples = []
    for language, code in re.findall(r"```(python|bash)\n(.*?)```", text, re.S):
        if f"127.0.0.1:{port}/v1" not in code:
            continue
        if language == "python":
            examples.append(([sys.executable, "-c", code], code.strip().splitlines()[-1]))
        else:
            # From the first curl on (the quick-start block starts with git and docker);
            # -f turns HTTP errors into a failing exit code.
            script = code[code.index("curl ") :].replace("curl -s", "curl -sSf").replace("curl http", "curl -sSf http")
            examples.append((["bash", "-euc", script], script.splitlines()[0]))
    return examples


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def container_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("container")
    token_file = tmp / "hf_token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("LNARIZE_") and key not in ("HF_TOKEN", "HF_TOKEN_PATH")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        ENTRYPOINT_SKIP_GPU_CHECK="1",
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_PORT=str(port),
        LNARIZE_DRAIN_TIMEOUT="10",
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HOME=str(tmp / "hf"),
        VLLM_CACHE_ROOT=str(tmp / "vllm"),
        HF_TOKEN_PATH=str(token_file),
    )
    log_path = tmp / "container.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(REPO_ROOT / "entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp
        )
    started = time.monotonic()
    try:
        yield {"process": process, "port": port, "log": log_path, "env": env, "started": started}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_container_start_ready_answer_and_sigterm(container_process) -> None:
    process, port = container_process["process"], container_process["port"]
    base = f"http://127.0.0.1:{port}"
    healthcheck = dockerfile_healthcheck_command()
    env = {"LNARIZE_PORT": str(port)}

    # The pid Docker would signal is the server itself: the script exec'd it.
    # Generous: importing vLLM alone took over a minute on a busy 2-core machine.
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while http_status(f"{base}/health/live") != 200:
        assert process.poll() is None, container_process["log"].read_text()
        assert time.monotonic() < deadline, "server never started listening"
        time.sleep(0.5)
    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"lnarize-serve") for part in cmdline), cmdline

    # While the engine loads, the HEALTHCHECK fails (ready still 503 afterwards,
    # so it was 503 while the check ran: readiness only ever goes loading -> ready).
    if subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0:
        assert http_status(f"{base}/health/ready") == 503
    else:
        pytest.fail("HEALTHCHECK passed before /health/ready could have been checked as loading")

    deadline = time.monotonic() + READY_TIMEOUT_S
    while subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0:
        assert process.poll() is None, container_process["log"].read_text()[-4000:]
        assert time.monotonic() < deadline, "not ready in time:\n" + container_process["log"].read_text()[-4000:]
        time.sleep(1)
    ready_after = time.monotonic() - container_process["started"]
    # The compose file's healthcheck command (fixed container port 9000) agrees.
    compose_check = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["lnarize"]["healthcheck"]
    compose_command = [sys.executable, *compose_check["test"][2:]]
    compose_command[-1] = compose_command[-1].replace("127.0.0.1:9000", f"127.0.0.1:{port}")
    assert subprocess.run(compose_command, capture_output=True, timeout=30).returncode == 0

    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "Paris" in reply.choices[0].message.content

    examples = serve_md_examples(port)
    assert sum(command[0] == "bash" for command, _ in examples) >= 2
    assert sum(command[0] != "bash" for command, _ in examples) >= 4
    for command, label in examples:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"SERVE.md example failed: {label}\n{result.stdout}\n{result.stderr}"
        print(f"--- {label}\n{result.stdout.strip()[:800]}")

    # Every series SERVE.md tells people to watch exists (speculative decoding
    # series only appear when MTP is on, i.e. on the GPU profiles).
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        exposed = response.read().decode()
    section = (REPO_ROOT / "SERVE.md").read_text().split("## 6. Metrics worth watching")[1].split("\n## ")[0]
    documented = set(re.findall(r"`((?:lnarize_|vllm:)[a-z_]+)", section))
    assert len(documented) >= 10
    missing = sorted(
        name for name in documented if "spec_decode" not in name and not re.search(rf"^{re.escape(name)}(?:_bucket|_sum|_count|_total)?[{{ ]", exposed, re.M)
    )
    assert not missing, f"SERVE.md documents series /metrics does not have: {missing}"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    log = container_process["log"].read_text()
    assert "entrypoint: GPU check skipped (ENTRYPOINT_SKIP_GPU_CHECK=1)" in log
    assert "Hugging Face token: read from" in log and TOKEN not in log
    print(f"ready after {ready_after:.1f} s; answer: {reply.choices[0].message.content!r}")
