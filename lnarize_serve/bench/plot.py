"""PNG plots: output throughput and TTFT p50 vs concurrency, one line per prompt length.

Several series (``bench compare``: plain vLLM and lnarize-serve) share the axes;
each series keeps its colour per prompt length and gets its own line style.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lnarize_serve.bench.stats import CellStats

_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


PLOT_EXTRA_MISSING = "--plot needs matplotlib, part of the bench extra: pip install 'lnarize-serve[bench]'"


def plot_support_problem() -> str | None:
    """None when --plot can work; else what to install (checked before a run starts)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return PLOT_EXTRA_MISSING
    return None


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(PLOT_EXTRA_MISSING) from exc
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_series(series: Mapping[str, Sequence[CellStats]], path: Path, title: str) -> None:
    plt = _pyplot()
    figure, (throughput_axis, ttft_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    prompt_lengths = sorted({s.prompt_tokens for stats in series.values() for s in stats})
    colours = {length: f"C{i}" for i, length in enumerate(prompt_lengths)}
    for (style, marker), (name, stats) in zip(_STYLES * 4, series.items()):
        for length in prompt_lengths:
            points = sorted((s for s in stats if s.prompt_tokens == length), key=lambda s: s.concurrency)
            if not points:
                continue
            label = f"{name}, prompt {length}" if len(series) > 1 else f"prompt {length}"
            concurrency = [s.concurrency for s in points]
            throughput_axis.plot(
                concurrency, [s.output_tok_s for s in points], style, marker=marker, color=colours[length], label=label
            )
            ttft_axis.plot(
                concurrency,
                [s.ttft_ms_p50 if s.ttft_ms_p50 is not None else float("nan") for s in points],
                style,
                marker=marker,
                color=colours[length],
                label=label,
            )
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator, ScalarFormatter

    concurrencies = sorted({s.concurrency for stats in series.values() for s in stats})
    for axis, ylabel in ((throughput_axis, "output tokens/s (aggregate)"), (ttft_axis, "TTFT p50 (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies)
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    throughput_axis.set_ylim(bottom=0)
    ttft_axis.set_yscale("log")
    ttft_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ttft_axis.yaxis.set_minor_formatter(NullFormatter())
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
