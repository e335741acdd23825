"""Per-cell statistics from timed requests (numpy percentiles, linear interpolation).

Definitions (docs/performance.md repeats them for readers of the numbers):
    window            first measured request sent -> last one finished
    requests/s        successful requests / window
    output tok/s      output tokens of successful requests / window (aggregate)
    per-stream tok/s  median over requests of (output tokens - 1) /
                      (last chunk - first chunk): the decode speed one user sees
    TTFT              first generated text chunk - request sent
    ITL               gaps between consecutive generated text chunks, pooled
                      over all requests (one token per chunk on vLLM without
                      speculative decoding; with MTP a chunk may carry several)
    E2E latency       stream end - request sent
Failed requests count as errors only; they add nothing to throughput or latency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from lnarize_serve.bench.client import RequestResult


@dataclass(frozen=True)
class Cell:
    concurrency: int
    prompt_tokens: int
    output_tokens: int

    @property
    def label(self) -> str:
        return f"c={self.concurrency} p={self.prompt_tokens} o={self.output_tokens}"


@dataclass
class CellStats:
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    requests: int
    errors: int
    window_s: float
    requests_per_s: float
    output_tok_s: float
    per_stream_tok_s: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    ttft_ms_p99: float | None
    itl_ms_p50: float | None
    itl_ms_p90: float | None
    e2e_ms_p50: float | None
    # What the server actually counted (usage), to check the workload was what was asked.
    prompt_tokens_seen: tuple[int, int] | None = None
    output_tokens_seen: tuple[int, int] | None = None
    usage_reported: bool = True
    error_messages: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def percentile_ms(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return None
    return float(np.percentile(array, q) * 1000.0)


def decode_rate(result: RequestResult) -> float | None:
    """Tokens per second after the first token, for one request."""
    if len(result.chunk_times) < 2 or result.output_tokens < 2:
        return None
    span = result.chunk_times[-1] - result.chunk_times[0]
    return (result.output_tokens - 1) / span if span > 0 else None


def _min_max(values: list[int]) -> tuple[int, int] | None:
    return (min(values), max(values)) if values else None


def summarize(cell: Cell, results: Sequence[RequestResult], window_s: float, complete: bool = True) -> CellStats:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    window = max(window_s, 1e-9)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = np.concatenate([np.diff(r.chunk_times) for r in ok if len(r.chunk_times) > 1] or [np.empty(0)])
    rates = [rate for r in ok if (rate := decode_rate(r)) is not None]
    return CellStats(
        concurrency=cell.concurrency,
        prompt_tokens=cell.prompt_tokens,
        output_tokens=cell.output_tokens,
        requests=len(ok),
        errors=len(failed),
        window_s=window_s,
        requests_per_s=len(ok) / window,
        output_tok_s=sum(r.output_tokens for r in ok) / window,
        per_stream_tok_s=float(np.median(rates)) if rates else None,
        ttft_ms_p50=percentile_ms(ttfts, 50),
        ttft_ms_p90=percentile_ms(ttfts, 90),
        ttft_ms_p99=percentile_ms(ttfts, 99),
        itl_ms_p50=percentile_ms(gaps, 50),
        itl_ms_p90=percentile_ms(gaps, 90),
        e2e_ms_p50=percentile_ms([r.end - r.start for r in ok], 50),
        prompt_tokens_seen=_min_max([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        output_tokens_seen=_min_max([r.completion_tokens for r in ok if r.completion_tokens is not None]),
        usage_reported=all(r.usage_reported for r in ok) if ok else False,
        error_messages=dict(Counter(r.error for r in failed if r.error).most_common(5)),
        complete=complete,
    )
