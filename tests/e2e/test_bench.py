"""`lnarize-serve bench` end to end: the real CLI against a real cpu-demo server.

One server for the module (serve's fixture helpers); one short grid run that
must produce exact prompt lengths, fixed output lengths, sane latencies, the
JSON document and the PNG plot. Budget: well under 3 minutes on the CI box.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import running_server
from tests.e2e.server_process import ServerProcess, base_env

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 64
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def demo_server(demo_model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    yield from running_server(base_env(LNARIZE_PROFILE="cpu-demo"), server_logs / "bench-server.log")


def run_bench(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lnarize_serve", "bench", "--no-progress", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_bench_measures_the_demo_server(demo_server: ServerProcess, tmp_path: Path):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    completed = run_bench(
        "--base-url", demo_server.url,
        "--concurrency", "1,2",
        "--prompt-tokens", str(PROMPT_TOKENS),
        "--output-tokens", str(OUTPUT_TOKENS),
        "--requests", "2",
        "--warmup", "1",
        "--max-duration", "120",
        "--json", str(json_path),
        "--plot", str(plot_path),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads(json_path.read_text())
    assert document["model"] == "smollm2-135m-instruct"
    assert any(note.startswith("prompt lengths: exact") for note in document["notes"])
    cells = document["cells"]
    assert [(c["concurrency"], c["prompt_tokens"]) for c in cells] == [(1, PROMPT_TOKENS), (2, PROMPT_TOKENS)]
    for cell in cells:
        assert cell["errors"] == 0 and cell["requests"] == 2 and cell["complete"]
        # What the server counted: the prompt is exact, EOS was ignored.
        assert cell["prompt_tokens_seen"] == [PROMPT_TOKENS, PROMPT_TOKENS]
        assert cell["output_tokens_seen"] == [OUTPUT_TOKENS, OUTPUT_TOKENS]
        assert 0 < cell["ttft_ms_p50"] <= cell["ttft_ms_p90"] <= cell["ttft_ms_p99"] < cell["e2e_ms_p50"] * 1.5
        assert 0 < cell["itl_ms_p50"] <= cell["itl_ms_p90"]
        assert cell["output_tok_s"] > 0 and cell["per_stream_tok_s"] > 0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The human table goes to stderr, with one row per cell.
    assert "out tok/s" in completed.stderr and "TTFT p50" in completed.stderr


def test_unknown_model_is_a_clear_error(demo_server: ServerProcess):
    completed = run_bench("--base-url", demo_server.url, "--model", "no-such-model", timeout=60)
    assert completed.returncode == 1
    assert "is not served" in completed.stderr and "smollm2-135m-instruct" in completed.stderr
    assert "Traceback" not in completed.stderr
