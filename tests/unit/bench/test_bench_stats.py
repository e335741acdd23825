"""Statistics of `lnarize-serve bench` on hand-built request timings (pure logic, no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lnarize_serve.bench.client import RequestResult
from lnarize_serve.bench.stats import Cell, decode_rate, percentile_ms, summarize

CELL = Cell(concurrency=2, prompt_tokens=128, output_tokens=5)


def timed(start: float, first: float, gap: float, tokens: int, prompt: int = 128) -> RequestResult:
    chunks = [first + i * gap for i in range(tokens)]
    return RequestResult(
        start=start, end=chunks[-1] + 0.001, chunk_times=chunks, prompt_tokens=prompt,
        completion_tokens=tokens, usage_reported=True,
    )


def test_throughput_counts_output_tokens_over_the_window():
    results = [timed(0.0, 0.5, 0.1, 5), timed(0.0, 0.7, 0.1, 5)]
    stats = summarize(CELL, results, window_s=2.0)
    assert stats.requests == 2 and stats.errors == 0
    assert stats.output_tok_s == pytest.approx(10 / 2.0)
    assert stats.requests_per_s == pytest.approx(1.0)


def test_ttft_and_itl_percentiles_match_numpy_linear_interpolation():
    firsts = [0.1, 0.2, 0.3, 0.4, 1.0]
    results = [timed(0.0, f, 0.05 * (i + 1), 3) for i, f in enumerate(firsts)]
    stats = summarize(CELL, results, window_s=5.0)
    assert stats.ttft_ms_p50 == pytest.approx(300.0)
    assert stats.ttft_ms_p90 == pytest.approx(np.percentile(firsts, 90) * 1000)
    assert stats.ttft_ms_p99 == pytest.approx(np.percentile(firsts, 99) * 1000)
    gaps = [0.05 * (i + 1) for i in range(5) for _ in range(2)]  # two gaps per request
    assert stats.itl_ms_p50 == pytest.approx(np.percentile(gaps, 50) * 1000)
    assert stats.itl_ms_p90 == pytest.approx(np.percentile(gaps, 90) * 1000)


def test_per_stream_rate_excludes_the_first_token():
    # 5 tokens, 0.1 s apart after the first: 4 tokens in 0.4 s = 10 tok/s, however long the TTFT.
    result = timed(0.0, 3.0, 0.1, 5)
    assert decode_rate(result) == pytest.approx(10.0)
    assert summarize(CELL, [result], 5.0).per_stream_tok_s == pytest.approx(10.0)


def test_failed_requests_are_counted_but_add_nothing_else():
    good = timed(0.0, 0.5, 0.1, 5)
    bad = RequestResult(start=0.0, end=9.0, error="HTTP 500: boom")
    stats = summarize(CELL, [good, bad, RequestResult(start=0.0, end=1.0, error="HTTP 500: boom")], window_s=1.0)
    assert stats.requests == 1 and stats.errors == 2
    assert stats.output_tok_s == pytest.approx(5.0)
    assert stats.ttft_ms_p50 == pytest.approx(500.0)
    assert stats.error_messages == {"HTTP 500: boom": 2}


def test_without_usage_the_chunks_are_counted_and_flagged():
    result = RequestResult(start=0.0, end=1.0, chunk_times=[0.2, 0.3, 0.4])
    stats = summarize(CELL, [result], window_s=1.0)
    assert result.output_tokens == 3
    assert stats.output_tok_s == pytest.approx(3.0)
    assert stats.usage_reported is False
    assert stats.prompt_tokens_seen is None


def test_token_counts_seen_are_reported_as_ranges():
    results = [timed(0.0, 0.1, 0.1, 5, prompt=128), timed(0.0, 0.1, 0.1, 4, prompt=127)]
    stats = summarize(CELL, results, 1.0)
    assert stats.prompt_tokens_seen == (127, 128)
    assert stats.output_tokens_seen == (4, 5)


def test_empty_cell_has_no_percentiles():
    stats = summarize(CELL, [], window_s=0.0)
    assert stats.requests == 0
    assert stats.ttft_ms_p50 is None and stats.itl_ms_p50 is None and stats.per_stream_tok_s is None
    assert percentile_ms([], 50) is None
    assert not math.isnan(stats.output_tok_s)
