"""`LNARIZE_KVTC_ENABLE=1` with the cpu-demo profile and nothing else: the
server fits the demo model's calibration on first use (or reuses it), and the
real openai client gets answers from a KVTC-compressed paged cache whose
capacity vLLM itself reports (exported as lnarize_kv_cache_capacity_tokens)."""

from __future__ import annotations

import openai
import pytest

from lnarize_serve import plan
from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env
from lnarize_serve.demo_model import demo_kvtc_calibration_path

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(server_logs):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_KVTC_ENABLE="1",
        LNARIZE_MAX_MODEL_LEN="2048",
    )
    yield from running_server(env, server_logs / "kvtc.log")


def test_kvtc_server_answers_from_a_5x_larger_compressed_cache(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content
    assert f"KVTC on: {demo_kvtc_calibration_path()}" in server.log_path.read_text()

    assert server.metric("lnarize_kvtc_enabled") == 1
    # LNARIZE_KVTC_SINK_TOKENS unset and the calibration has the constants
    assert server.metric("lnarize_kvtc_exact_sink_tokens") == 1
    assert server.metric("lnarize_kvtc_window_tokens") == 128  # the default
    assert server.metric("lnarize_kvtc_bytes_per_token_per_kv_head") == 48
    assert server.metric("lnarize_kvtc_compression_ratio") == pytest.approx(256 / 48)
    smol = plan.ModelGeometry("SmolLM2", num_attention_layers=30, num_kv_heads=3, head_dim=64)
    request = plan.PlanRequest(kv_memory_bytes=plan.GIB, max_model_len=2048, max_num_seqs=8,
                               block_size=128)
    bf16 = plan.mode_capacity(smol, request, "bf16").capacity_tokens
    kvtc = plan.mode_capacity(smol, request, "kvtc", kvtc_slot_bytes=48).capacity_tokens
    capacity = server.metric("lnarize_kv_cache_capacity_tokens")
    assert capacity == kvtc
    assert capacity >= 5 * bf16
