"""The series a router reads (the Gateway API Inference Extension's endpoint
picker: vllm:kv_cache_usage_perc, vllm:cache_config_info, the request queues)
describe the KVTC-compressed pool: the real server on the CPU engine, cpu-demo
in float32 with KVTC on, filled by concurrent long requests while /metrics is
read."""

from __future__ import annotations

import math
import random
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lnarize_serve import plan
from tests.e2e.conftest import running_server
from tests.e2e.server_process import base_env
from tests.fixtures.kvtc_calibrations import smollm2_calibration

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 2048
CONCURRENT = 8  # the engine's max_num_seqs
REQUESTS = 10  # two more than run at once: they wait, and vllm:num_requests_waiting shows it
PROMPT_TOKENS = 1000
OUTPUT_TOKENS = 32  # KVTC decode on this CPU takes seconds per step; the blocks come from the prompts
# What the endpoint picker reads (its model-server protocol; llm-d-router's defaults for vLLM).
PICKER_SERIES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info")
ADAPTER_VALUES = Path(__file__).resolve().parents[2] / "config" / "k8s" / "prometheus-adapter" / "values.yaml"
KVTC_SLOT_BYTES = 48  # the K3V3 test calibration
SMOLLM2 = plan.ModelGeometry("SmolLM2", num_attention_layers=30, num_kv_heads=3, head_dim=64)
_SAMPLE = re.compile(r'^(?P<name>[^{\s]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def server(server_logs):
    env = base_env(
        LNARIZE_PROFILE="cpu-demo",
        LNARIZE_DTYPE="float32",
        LNARIZE_KVTC_ENABLE="1",
        LNARIZE_KVTC_CALIBRATION=str(smollm2_calibration()),
        LNARIZE_MAX_MODEL_LEN=str(MAX_MODEL_LEN),
        LNARIZE_MAX_NUM_SEQS=str(CONCURRENT),
    )
    yield from running_server(env, server_logs / "kvtc-router-metrics.log")


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    return samples_in(httpx.get(f"{url}/metrics", timeout=10).text, name)


def samples_in(exposition: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            found.append((dict(_LABEL.findall(match["labels"] or "")), float(match["value"])))
    return found


def single_value(url: str, name: str) -> float:
    return single_value_in(httpx.get(f"{url}/metrics", timeout=10).text, name)


def single_value_in(exposition: str, name: str) -> float:
    (only,) = samples_in(exposition, name)
    return only[1]


def cache_config(url: str) -> dict[str, str]:
    (only,) = samples(url, "vllm:cache_config_info")
    return only[0]


def distinct_prompt(seed: int) -> list[int]:
    # Token ids, so the length is exact; distinct per request, so prefix caching shares nothing.
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)]


def test_cache_config_info_describes_the_compressed_pool(server):
    info = cache_config(server.url)
    block_size, blocks = int(info["block_size"]), int(info["num_gpu_blocks"])
    capacity = single_value(server.url, "lnarize_kv_cache_capacity_tokens")
    # The pool the labels describe is the one vLLM sized from KVTC's 48-byte slots,
    # 5.33x what the same memory holds in bf16.
    assert blocks * block_size == capacity
    request = plan.PlanRequest(kv_memory_bytes=plan.GIB, max_model_len=MAX_MODEL_LEN,
                               max_num_seqs=CONCURRENT, block_size=block_size)
    expected = plan.mode_capacity(SMOLLM2, request, "kvtc", kvtc_slot_bytes=KVTC_SLOT_BYTES)
    bf16 = plan.mode_capacity(SMOLLM2, request, "bf16")
    assert capacity == expected.capacity_tokens
    assert capacity >= 5 * bf16.capacity_tokens
    assert info["cache_dtype"] == "auto"
    assert info["enable_prefix_caching"] == "True"


def test_kv_usage_gauge_moves_with_the_compressed_pool(server):
    info = cache_config(server.url)
    block_size, blocks = int(info["block_size"]), int(info["num_gpu_blocks"])
    assert single_value(server.url, "vllm:kv_cache_usage_perc") == 0

    finished: list[int] = []
    errors: list[BaseException] = []

    def one_request(seed: int) -> None:
        try:
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": MODEL, "prompt": distinct_prompt(seed), "max_tokens": OUTPUT_TOKENS,
                      "min_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0},
                timeout=1100,
            )
            response.raise_for_status()
            finished.append(response.json()["usage"]["completion_tokens"])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=one_request, args=(seed,)) for seed in range(REQUESTS)]
    readings: list[tuple[float, float, float]] = []  # usage, running, waiting
    # Read over one connection opened before generation starts (and kept
    # alive by the readings themselves).
    with server.connected_client(timeout=10) as metrics:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            exposition = metrics.get("/metrics").text
            readings.append((
                single_value_in(exposition, "vllm:kv_cache_usage_perc"),
                single_value_in(exposition, "vllm:num_requests_running"),
                single_value_in(exposition, "vllm:num_requests_waiting"),
            ))
            time.sleep(0.2)
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert finished == [OUTPUT_TOKENS] * REQUESTS

    peak = max(usage for usage, _, _ in readings)
    # vLLM's usage is blocks in use over num_gpu_blocks - 1 (one block is its reserved null block).
    used_blocks = peak * (blocks - 1)
    assert used_blocks == pytest.approx(round(used_blocks), abs=1e-6), (peak, blocks)
    # At the peak eight run: each holds at least its prompt's blocks, at most prompt + output.
    assert CONCURRENT * (PROMPT_TOKENS // block_size) <= round(used_blocks), (peak, readings)
    assert round(used_blocks) <= CONCURRENT * math.ceil((PROMPT_TOKENS + OUTPUT_TOKENS) / block_size), peak
    # The gauge rose over the run (not one jump) and all eight ran together.
    usages = [usage for usage, _, _ in readings]
    assert len({round(u, 6) for u in usages if 0 < u < peak}) >= 3, readings
    assert max(running for _, running, _ in readings) == CONCURRENT, readings
    assert max(waiting for _, _, waiting in readings) >= 1, readings

    # Finished requests give their blocks back (prefix-cached blocks count as free).
    deadline = time.monotonic() + 10
    while single_value(server.url, "vllm:kv_cache_usage_perc") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert single_value(server.url, "vllm:kv_cache_usage_perc") == 0
    assert single_value(server.url, "vllm:num_requests_running") == 0


def test_the_series_the_picker_and_the_autoscaler_read_are_exported(server):
    for name in PICKER_SERIES:
        assert samples(server.url, name), name
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"]).group(1)
        assert samples(server.url, series), series
