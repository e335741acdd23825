"""`bench compare`: A/B schedule, pairing and ratios (pure logic)."""

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


def test_markdown_table_has_one_row_per_cell_with_the_spread():
    from lnarize_serve.bench.compare_cli import comparison_markdown

    measurements = [measurement("vllm", 0, 0.100, 0.01), measurement("ours", 0, 0.102, 0.01),
                    measurement("ours", 1, 0.101, 0.01), measurement("vllm", 1, 0.100, 0.01)]
    table = comparison_markdown([c.to_dict() for c in compare_cells(measurements, "vllm", "ours")])
    header, rule, row = table.strip().splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row.startswith("| 1 | 128 | 2 |") and "+1.5" in row and "[0.985, 0.992]" in row
