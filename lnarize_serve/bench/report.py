"""Human tables (rich) and machine JSON for bench results."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lnarize_serve.bench.stats import CellStats


def make_console() -> Console:
    """Console on stderr; logs and pipes get a wide fixed width so tables are not truncated."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=200)
    return console


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _range(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return "?"
    low, high = pair
    return str(low) if low == high else f"{low}-{high}"


def cells_table(stats: Sequence[CellStats], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in (
        "conc", "prompt", "out", "reqs", "err", "req/s", "out tok/s", "tok/s/stream",
        "TTFT p50", "p90", "p99", "ITL p50", "p90",
    ):
        table.add_column(name, justify="right")
    for s in stats:
        table.add_row(
            str(s.concurrency),
            _range(s.prompt_tokens_seen) if s.prompt_tokens_seen else f"{s.prompt_tokens}?",
            _range(s.output_tokens_seen) if s.output_tokens_seen else f"{s.output_tokens}?",
            str(s.requests) + ("" if s.complete else "*"),
            str(s.errors),
            _fmt(s.requests_per_s, 2),
            _fmt(s.output_tok_s),
            _fmt(s.per_stream_tok_s),
            _fmt(s.ttft_ms_p50),
            _fmt(s.ttft_ms_p90),
            _fmt(s.ttft_ms_p99),
            _fmt(s.itl_ms_p50),
            _fmt(s.itl_ms_p90),
        )
    table.caption = (
        "prompt/out: tokens the server counted (usage); times in ms; * = cut by the time bound"
    )
    return table


def print_cells(console: Console, stats: Sequence[CellStats], title: str) -> None:
    console.print(cells_table(stats, title))
    for s in stats:
        for message, count in s.error_messages.items():
            console.print(f"[red]c={s.concurrency} p={s.prompt_tokens}: {count} x {message}[/red]")


def environment() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def emit_json(destination: Path, document: dict[str, Any], console: Console) -> None:
    """Write the run's JSON to a file, or to stdout when the destination is "-"."""
    if str(destination) == "-":
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        return
    write_json(destination, document)
    console.print(f"JSON: {destination}")
