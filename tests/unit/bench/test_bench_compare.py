"""`bench compare`: A/B schedule, pairing and ratios (pure logic), and the plain-vLLM
command built from lnarize-serve's engine arguments (checked with vLLM's real parser)."""

from __future__ import annotations

import pytest

from lnarize_serve.bench.client import RequestResult
from lnarize_serve.bench.compare import ArmMeasurement, arm_order, compare_cells, spread
from lnarize_serve.bench.stats import Cell, summarize

CELL = Cell(concurrency=1, prompt_tokens=128, output_tokens=4)


def measurement(arm: str, round_index: int, ttft: float, gap: float, complete: bool = True) -> ArmMeasurement:
    raw = []
    for i in range(4):
        start = 10.0 * i
        chunks = [start + ttft + k * gap for k in range(4)]
        raw.append(RequestResult(start=start, end=chunks[-1], chunk_times=chunks, completion_tokens=4,
                                 prompt_tokens=128, usage_reported=True))
    window = sum(r.end - r.start for r in raw)
    stats = summarize(CELL, raw, window, complete=complete)
    return ArmMeasurement(arm, round_index, 0, stats, raw, other_arm_cpu_s=0.0)


def test_order_flips_every_round():
    arms = ("a", "b")
    assert [arm_order(r, arms) for r in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_ratios_and_ttft_differences_per_round_and_pooled():
    measurements = [
        measurement("vllm", 0, ttft=0.100, gap=0.010),
        measurement("ours", 0, ttft=0.102, gap=0.010),
        measurement("ours", 1, ttft=0.101, gap=0.010),
        measurement("vllm", 1, ttft=0.100, gap=0.010),
    ]
    (comparison,) = compare_cells(measurements, "vllm", "ours")
    assert comparison.rounds == 2
    assert comparison.ttft_p50_diffs_ms == pytest.approx([2.0, 1.0])
    assert comparison.pooled_ttft_p50_diff_ms == pytest.approx(1.5)
    # Same decode, slightly later first token: each request takes 2 ms (1 ms) longer.
    expected = [(0.130) / (0.132), (0.130) / (0.131)]
    assert comparison.throughput_ratios == pytest.approx(expected)
    assert comparison.pooled_throughput_ratio == pytest.approx(2 * 0.130 / (0.132 + 0.131))
    assert comparison.a_throughput_cv == pytest.approx(0.0)
    median, low, high = spread(comparison.throughput_ratios)
    assert low <= median <= high


def test_a_round_missing_one_arm_or_cut_by_the_deadline_is_not_paired():
    measurements = [
        measurement("vllm", 0, ttft=0.1, gap=0.01),
        measurement("ours", 0, ttft=0.1, gap=0.01),
        measurement("vllm", 1, ttft=0.1, gap=0.01),
        measurement("ours", 1, ttft=0.5, gap=0.01, complete=False),
    ]
    (comparison,) = compare_cells(measurements, "vllm", "ours")
    assert comparison.rounds == 1
    assert comparison.ttft_p50_diffs_ms == pytest.approx([0.0])


# The plain-vLLM side ------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_parser():
    from lnarize_serve.bench.servers import _vllm_parser

    return _vllm_parser()


def test_cpu_demo_engine_arguments_reach_plain_vllm_unchanged(vllm_parser, monkeypatch):
    from lnarize_serve.bench.servers import check_flags, vllm_flags
    from lnarize_serve.engine_args import engine_arg_values
    from lnarize_serve.settings import Settings

    for key in list(__import__("os").environ):
        if key.startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    settings = Settings(profile="cpu-demo", max_num_seqs=16, dtype="float32")
    values = engine_arg_values(settings, "/models/smollm2")
    values.update({"tool_call_parser": "qwen3_xml", "enable_auto_tool_choice": True})
    model = values.pop("model")
    flags = ["--model", model, *vllm_flags(values, vllm_parser)]
    assert "--enforce-eager" in flags and "--enable-prefix-caching" in flags
    assert flags[flags.index("--max-num-seqs") + 1] == "16"
    check_flags(flags, {**values, "model": model}, vllm_parser)  # raises on any mismatch


def test_production_shape_with_mtp_and_cuda_graphs_maps_too(vllm_parser, monkeypatch):
    from lnarize_serve.bench.servers import check_flags, vllm_flags
    from lnarize_serve.engine_args import engine_arg_values
    from lnarize_serve.settings import Settings

    for key in list(__import__("os").environ):
        if key.startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    values = engine_arg_values(Settings(profile="interactive"))
    model = values.pop("model")
    flags = ["--model", model, *vllm_flags(values, vllm_parser)]
    assert "--no-enforce-eager" in flags or "--enforce-eager" not in flags
    check_flags(flags, {**values, "model": model}, vllm_parser)


def test_a_flag_that_parses_differently_is_refused(vllm_parser):
    from lnarize_serve.bench.servers import ServerStartError, check_flags

    with pytest.raises(ServerStartError, match="max_num_seqs"):
        check_flags(["--model", "m", "--max-num-seqs", "8"], {"model": "m", "max_num_seqs": 16}, vllm_parser)
