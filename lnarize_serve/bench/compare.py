"""A/B measurement of two servers on the same grid, and per-cell ratios.

Schedule: both servers stay up; only one receives load at a time. For each
round and each cell both arms run back to back, and the order flips every
round (round 0: A B, round 1: B A, ...), so slow drift of the machine (other
jobs, thermal state) hits both arms alike instead of always favouring the arm
that goes first. Every round uses fresh prompts (identical for A and B within
the round), so neither server gets prefix-cache hits from an earlier round.

Before each arm the run pauses ``settle_s``: vLLM's worker busy-polls its
shared-memory queue for ~1 s after its last request (SpinCondition), and that
spin must not overlap the other arm's measurement. The CPU seconds the idle
server used during each arm are recorded, so the report can show the idle arm
really was idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from lnarize_serve.bench.client import RequestResult
from lnarize_serve.bench.driver import DeadlineReached, GridSpec, Progress, Target, run_cell
from lnarize_serve.bench.stats import Cell, CellStats, summarize


@dataclass
class Arm:
    """One side of the comparison."""

    name: str
    http: httpx.AsyncClient
    target: Target
    # CPU seconds used so far by the server (process tree); None if not ours to watch.
    cpu_seconds: Callable[[], float] | None = None
    # CPU seconds used so far by the server's HTTP/API process alone.
    frontend_cpu_seconds: Callable[[], float] | None = None


@dataclass
class ArmMeasurement:
    arm: str
    round_index: int
    order: int
    stats: CellStats
    raw: list[RequestResult] = field(repr=False)
    other_arm_cpu_s: float | None
    # The arm's own API process, per request sent in the cell (warm-up included).
    frontend_cpu_ms_per_request: float | None = None


@dataclass
class CellComparison:
    """Per-cell result: B relative to A (B = lnarize-serve in `bench compare`)."""

    cell: Cell
    rounds: int
    # Per-round ratios / differences; their spread is the measurement noise.
    throughput_ratios: list[float]
    ttft_p50_diffs_ms: list[float]
    itl_p50_diffs_ms: list[float]
    # Pooled over all rounds, per arm.
    pooled_a: CellStats
    pooled_b: CellStats
    # The same arm round to round: the noise floor of one arm.
    a_throughput_cv: float | None
    # API-process CPU per request (median over rounds), per arm.
    frontend_cpu_ms_a: float | None = None
    frontend_cpu_ms_b: float | None = None

    @property
    def pooled_throughput_ratio(self) -> float:
        return self.pooled_b.output_tok_s / self.pooled_a.output_tok_s if self.pooled_a.output_tok_s else float("nan")

    @property
    def pooled_ttft_p50_diff_ms(self) -> float | None:
        if self.pooled_a.ttft_ms_p50 is None or self.pooled_b.ttft_ms_p50 is None:
            return None
        return self.pooled_b.ttft_ms_p50 - self.pooled_a.ttft_ms_p50

    def to_dict(self) -> dict:
        return {
            "concurrency": self.cell.concurrency,
            "prompt_tokens": self.cell.prompt_tokens,
            "output_tokens": self.cell.output_tokens,
            "rounds": self.rounds,
            "throughput_ratio_pooled": self.pooled_throughput_ratio,
            "throughput_ratio_per_round": self.throughput_ratios,
            "ttft_p50_diff_ms_pooled": self.pooled_ttft_p50_diff_ms,
            "ttft_p50_diff_ms_per_round": self.ttft_p50_diffs_ms,
            "itl_p50_diff_ms_per_round": self.itl_p50_diffs_ms,
            "a_throughput_cv": self.a_throughput_cv,
            "frontend_cpu_ms_per_request_a": self.frontend_cpu_ms_a,
            "frontend_cpu_ms_per_request_b": self.frontend_cpu_ms_b,
            "a": self.pooled_a.to_dict(),
            "b": self.pooled_b.to_dict(),
        }


def arm_order(round_index: int, arms: Sequence[Arm]) -> list[Arm]:
    return list(arms) if round_index % 2 == 0 else list(reversed(arms))


async def run_alternating(
    arms: tuple[Arm, Arm],
    spec: GridSpec,
    rounds: int,
    deadline: float,
    settle_s: float = 2.0,
    progress: Progress | None = None,
    on_measured: Callable[[ArmMeasurement], None] = lambda m: None,
) -> tuple[list[ArmMeasurement], bool]:
    """Run rounds x cells x arms; returns (measurements, finished_all)."""
    measurements: list[ArmMeasurement] = []
    cells = spec.cells()
    for round_index in range(rounds):
        for cell_index, cell in enumerate(cells):
            for position, arm in enumerate(arm_order(round_index, arms)):
                other = arms[1] if arm is arms[0] else arms[0]
                await asyncio.sleep(settle_s)
                other_before = other.cpu_seconds() if other.cpu_seconds else None
                frontend_before = arm.frontend_cpu_seconds() if arm.frontend_cpu_seconds else None
                raw: list[RequestResult] = []
                try:
                    stats = await run_cell(
                        arm.http, arm.target, spec, cell, cell_index, deadline, round_index, progress, keep=raw
                    )
                except DeadlineReached:
                    return measurements, False
                other_cpu = other.cpu_seconds() - other_before if other.cpu_seconds and other_before is not None else None
                frontend_ms = None
                if arm.frontend_cpu_seconds and frontend_before is not None:
                    sent = spec.warmup_requests(cell) + stats.requests + stats.errors
                    frontend_ms = 1000.0 * (arm.frontend_cpu_seconds() - frontend_before) / max(sent, 1)
                measurement = ArmMeasurement(arm.name, round_index, position, stats, raw, other_cpu, frontend_ms)
                measurements.append(measurement)
                on_measured(measurement)
                if not stats.complete:
                    return measurements, False
    return measurements, True


def _cv(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = float(np.mean(values))
    return float(np.std(values, ddof=1) / mean) if mean else None


def compare_cells(measurements: Sequence[ArmMeasurement], a: str, b: str) -> list[CellComparison]:
    """Pair A and B per (round, cell); only rounds where both arms completed the cell count."""
    by_key: dict[tuple[Cell, int], dict[str, ArmMeasurement]] = {}
    for m in measurements:
        if m.stats.complete:
            cell = Cell(m.stats.concurrency, m.stats.prompt_tokens, m.stats.output_tokens)
            by_key.setdefault((cell, m.round_index), {})[m.arm] = m
    cells = list(dict.fromkeys(cell for cell, _ in by_key))
    comparisons = []
    for cell in cells:
        pairs = [by_key[(c, r)] for (c, r) in by_key if c == cell and a in by_key[(c, r)] and b in by_key[(c, r)]]
        if not pairs:
            continue
        thr, ttft, itl = [], [], []
        for pair in pairs:
            sa, sb = pair[a].stats, pair[b].stats
            if sa.output_tok_s:
                thr.append(sb.output_tok_s / sa.output_tok_s)
            if sa.ttft_ms_p50 is not None and sb.ttft_ms_p50 is not None:
                ttft.append(sb.ttft_ms_p50 - sa.ttft_ms_p50)
            if sa.itl_ms_p50 is not None and sb.itl_ms_p50 is not None:
                itl.append(sb.itl_ms_p50 - sa.itl_ms_p50)
        comparisons.append(
            CellComparison(
                cell=cell,
                rounds=len(pairs),
                throughput_ratios=thr,
                ttft_p50_diffs_ms=ttft,
                itl_p50_diffs_ms=itl,
                pooled_a=_pooled(cell, [p[a] for p in pairs]),
                pooled_b=_pooled(cell, [p[b] for p in pairs]),
                a_throughput_cv=_cv([p[a].stats.output_tok_s for p in pairs]),
                frontend_cpu_ms_a=_median([p[a].frontend_cpu_ms_per_request for p in pairs]),
                frontend_cpu_ms_b=_median([p[b].frontend_cpu_ms_per_request for p in pairs]),
            )
        )
    return comparisons


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def _pooled(cell: Cell, measurements: Sequence[ArmMeasurement]) -> CellStats:
    """All rounds of one arm as one sample: requests pooled, windows summed."""
    raw = [r for m in measurements for r in m.raw]
    return summarize(cell, raw, sum(m.stats.window_s for m in measurements))


def spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, min, max) of per-round values."""
    if not values:
        return None
    return float(np.median(values)), float(min(values)), float(max(values))
