"""The production engine shape on CPU: a hybrid Qwen3-Next (Gated DeltaNet +
full attention + MoE) with an MTP head, served with MTP speculative decoding
on (LNARIZE_SPECULATIVE_TOKENS=3, as the production profiles set it). The
same server then proves the engine-death path (last test: it ends the server).

The model is tiny and random (built by tests/fixtures/tiny_qwen3_next.py), so
the test checks mechanics, not text: requests are served, and vLLM's own
speculative-decoding counters show drafts were proposed and verified.
Prefix caching is off: on CPU, MTP + prefix caching on a hybrid model hits a
Triton-only kernel (see shared CPU engine notes); GPUs keep vLLM's default.
"""

from __future__ import annotations

import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env
from tests.fixtures.tiny_qwen3_next import build_tiny_qwen3_next

pytestmark = pytest.mark.e2e

MODEL = "tiny-qwen3-next-mtp"
EXIT_ENGINE_DIED = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_logs):
    model_dir = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next"))
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_MODEL=str(model_dir),
        LNARIZE_SERVED_MODEL_NAME=MODEL,
        # The checkpoint's bf16, not the demo preset's float32: vLLM-CPU's GDN
        # kernels refuse float32 on AVX-512-BF16 CPUs ("CPU GDN attention
        # requires BF16"); the weights are random, so accuracy is not at stake.
        LNARIZE_DTYPE="auto",
        LNARIZE_SPECULATIVE_TOKENS="3",
        LNARIZE_ENABLE_PREFIX_CACHING="false",
        LNARIZE_MAX_MODEL_LEN="1024",
        LNARIZE_TOOL_CALL_PARSER="none",
        LNARIZE_ENABLE_AUTO_TOOL_CHOICE="false",
    )
    yield from running_server(env, server_logs / "hybrid-mtp.log")


def test_warm_up_ran_decode_and_mtp_verify_steps_before_ready(server):
    """Nothing but the server's own warm-up has run yet: vLLM's counters show
    its tokens and at least one proposed (and verified) draft."""
    from lnarize_serve.runtime import warmup_max_tokens

    assert server.metric("vllm:generation_tokens_total") == warmup_max_tokens(3)
    drafts = server.metric("vllm:spec_decode_num_drafts_total")
    assert drafts and drafts >= 1, "the warm-up proposed no speculative draft"


def test_mtp_speculative_decoding_serves_requests(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.completions.create(
        model=MODEL, prompt="hello world", max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 32
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.completion_tokens == 16

    drafts = server.metric("vllm:spec_decode_num_drafts_total")
    draft_tokens = server.metric("vllm:spec_decode_num_draft_tokens_total")
    assert drafts and drafts > 0, "no speculative drafts were proposed"
    # n=3: three draft tokens per proposal (fewer only where a request's end clips one).
    assert 2 * drafts < draft_tokens <= 3 * drafts
    assert server.metric("vllm:spec_decode_num_accepted_tokens_total") is not None


def engine_core_process(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        if child.name().startswith("VLLM::EngineCor") or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore child process found")


def test_engine_death_fails_liveness_and_exits_nonzero(server):
    """No fake: the real engine-core process is SIGKILLed, as an OOM kill would do."""
    engine_core_process(server.process.pid).send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first_503_after = None
    while server.process.poll() is None and time.monotonic() - killed_at < 30:
        try:
            if httpx.get(f"{server.url}/health/live", timeout=2).status_code == 503 and first_503_after is None:
                first_503_after = time.monotonic() - killed_at
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    assert server.wait_exit(timeout=30) == EXIT_ENGINE_DIED, server.log_tail()
    exited_after = time.monotonic() - killed_at
    print(f"engine killed: live 503 after {first_503_after} s, process exited after {exited_after:.1f} s")
    assert first_503_after is not None and first_503_after < 5, server.log_tail()
    assert exited_after < 15
