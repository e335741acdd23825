"""A rich progress bar wired to the driver's hooks (on stderr, so stdout JSON stays clean)."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lnarize_serve.bench import driver
from lnarize_serve.bench.stats import Cell


@contextmanager
def progress_bar(console: Console, total_requests: int, enabled: bool = True) -> Iterator[driver.Progress]:
    if not enabled:
        yield driver.Progress()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=total_requests, errors=0)
        errors = 0

        def cell_started(cell: Cell, requests: int) -> None:
            bar.update(task, description=cell.label)

        def request_done(result) -> None:
            nonlocal errors
            errors += 0 if result.ok else 1
            bar.update(task, advance=1, errors=errors)

        yield driver.Progress(cell_started=cell_started, request_done=request_done)
