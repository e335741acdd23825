"""The GPU serving benchmark's pure parts: arm specs, metric and log parsing, decode rate, the table."""

import argparse

import pytest

from benchmarks.gpu_serve import (
    ArmResult,
    LoadResult,
    decode_rate,
    markdown,
    parse_arm,
    parse_metrics,
    read_log_facts,
)
from lnarize_serve.bench.client import RequestResult


def test_arm_spec_names_its_settings():
    arm = parse_arm("kvtc:LNARIZE_KVTC_ENABLE=1,LNARIZE_KVTC_WINDOW_TOKENS=128")
    assert arm.name == "kvtc"
    assert arm.settings == {"LNARIZE_KVTC_ENABLE": "1", "LNARIZE_KVTC_WINDOW_TOKENS": "128"}
    assert not arm.plain_vllm
    assert parse_arm("vllm").plain_vllm and parse_arm("vllm").settings == {}


@pytest.mark.parametrize("text", ["kvtc:KVTC_ENABLE=1", "fp8:LNARIZE_KV_CACHE_DTYPE", ":LNARIZE_X=1"])
def test_arm_spec_rejects_what_is_no_setting(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_arm(text)


def test_metrics_are_summed_over_labels():
    text = "\n".join([
        "# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0',
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 5.0',
        "lnarize_engine_load_seconds 182.5",
        "broken line without value x",
    ])
    metrics = parse_metrics(text)
    assert metrics["vllm:spec_decode_num_drafts_total"] == 15.0
    assert metrics["lnarize_engine_load_seconds"] == 182.5


def test_log_facts_read_vllms_own_lines(tmp_path):
    log = tmp_path / "arm.log"
    log.write_text(
        "(EngineCore pid=1) INFO [gpu_worker.py:760] Available KV cache memory: 97.43 GiB\n"
        "(EngineCore pid=1) INFO [kv_cache_utils.py:2328] GPU KV cache size: 102,241,180 tokens, "
        "Maximum concurrency for 4,096 tokens per request: 24961.23x\n"
        "INFO Initializing a V1 LLM engine with config: compilation_config={'cudagraph_mode': "
        "<CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>}\n"
        "WARNING [system_utils.py:152] We must use the `spawn` multiprocessing start method. Overriding "
        "VLLM_WORKER_MULTIPROC_METHOD to 'spawn'. See https://docs.vllm.ai/... for more information. "
        "Reasons: CUDA is initialized\n"
    )
    facts = read_log_facts(log)
    assert facts["spawn_forced"] == "CUDA is initialized"
    assert facts["kv_cache_tokens"] == 102_241_180
    assert facts["available_kv_gib"] == "97.43"
    assert facts["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert read_log_facts(tmp_path / "missing.log") == {}


def test_decode_rate_counts_from_the_first_chunk_to_the_stream_end():
    # 11 tokens: the 10 after the first took 0.5 s, even though the chunks arrived bunched.
    result = RequestResult(start=0.0, end=1.5, chunk_times=[1.0, 1.01, 1.02], completion_tokens=11)
    assert decode_rate(result) == pytest.approx(20.0)
    assert decode_rate(RequestResult(start=0.0, end=1.0, chunk_times=[0.5], completion_tokens=1)) is None


def test_table_shows_every_arm_and_load():
    ok = ArmResult("bf16", {}, ready_s=190.0, first_request_tok_s=180.0, log_facts={"kv_cache_tokens": 1000}, plan_tokens=1000, plan_exact=True,
                   loads=[LoadResult(1024, 1, 200.0, 200.0, 50.0)], mtp={"acceptance": 0.01, "tokens_per_step": 1.03})
    failed = ArmResult("kvtc", {"LNARIZE_KVTC_ENABLE": "1"}, error="exited with 1 before ready:\nTraceback")
    table = markdown([ok, failed])
    assert "| bf16 | 190.0 |" in table and "| 180.0 | 1,000 | 1,000 |" in table
    assert "| fork | - |" in table
    spawned = ArmResult("kvtc", {}, ready_s=100.0, kvtc_decode_before_ready=True,
                        log_facts={"spawn_forced": "CUDA is initialized"})
    assert "| spawn (CUDA is initialized) | yes |" in markdown([spawned])
    assert "| bf16 | 1,024 | 1 | 200.0 | 200.0 | 50.0 | 0 |" in table
    assert "| kvtc | failed: exited with 1 before ready: |" in table
