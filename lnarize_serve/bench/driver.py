"""Drive the grid: for each (prompt length, concurrency) cell, a warm-up wave and
then a closed loop of ``concurrency`` streams until the cell's requests are done.

Closed loop: each of the ``concurrency`` workers sends its next request as soon
as its previous one finished, so exactly ``concurrency`` requests are in flight
(the "N users" the model card's numbers mean). The warm-up wave (one request per
stream by default) runs first and is discarded: it absorbs first-request costs
(connection set-up, allocator growth, lazy initialisation) that a long-running
server does not pay. The whole run has a deadline; a cell cut by it is reported
as incomplete and later cells are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from lnarize_serve.bench.client import (
    ChatEndpoint,
    RequestResult,
    count_prompt_tokens,
    list_models,
    probe_fixed_length_support,
    stream_chat,
)
from lnarize_serve.bench.stats import Cell, CellStats, summarize
from lnarize_serve.bench.workload import PromptSource, TokenizerPrompts, calibrate, chat_messages, load_tokenizer

logger = logging.getLogger(__name__)

# Seeds are spaced so no two requests of a run share a prompt (prefix caching
# would otherwise turn later prompts into cache hits).
_SEEDS_PER_CELL = 100_000
_SEEDS_PER_ROUND = 100 * _SEEDS_PER_CELL


@dataclass
class GridSpec:
    concurrencies: Sequence[int]
    prompt_tokens: Sequence[int]
    output_tokens: int
    # Measured requests per cell; None: max(min_requests, waves * concurrency).
    requests_per_cell: int | None = None
    min_requests: int = 8
    waves: int = 2
    # Warm-up requests per cell; None: one per stream.
    warmup_per_cell: int | None = None

    def cells(self) -> list[Cell]:
        return [Cell(c, p, self.output_tokens) for p in self.prompt_tokens for c in self.concurrencies]

    def measured_requests(self, cell: Cell) -> int:
        if self.requests_per_cell is not None:
            return self.requests_per_cell
        return max(self.min_requests, self.waves * cell.concurrency)

    def warmup_requests(self, cell: Cell) -> int:
        return cell.concurrency if self.warmup_per_cell is None else self.warmup_per_cell

    def total_requests(self) -> int:
        return sum(self.measured_requests(c) + self.warmup_requests(c) for c in self.cells())


@dataclass
class Progress:
    """Hooks for a progress display; all optional."""

    cell_started: Callable[[Cell, int], None] = lambda cell, total: None
    request_done: Callable[[RequestResult], None] = lambda result: None
    cell_done: Callable[[CellStats], None] = lambda stats: None


@dataclass
class Target:
    """A server ready to be measured: endpoint plus the prompt source that fits its model."""

    endpoint: ChatEndpoint
    prompts: PromptSource
    notes: list[str] = field(default_factory=list)


class DeadlineReached(Exception):
    pass


def resolve_model(models: list[dict], requested: str | None, base_url: str) -> dict:
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model")
    if requested is None:
        if len(models) > 1:
            names = ", ".join(m.get("id", "?") for m in models)
            raise RuntimeError(f"the server serves several models ({names}); pick one with --model")
        return models[0]
    for entry in models:
        if entry.get("id") == requested:
            return entry
    names = ", ".join(m.get("id", "?") for m in models)
    raise RuntimeError(f"model {requested!r} is not served at {base_url} (it serves: {names})")


async def prepare_target(
    http: httpx.AsyncClient,
    endpoint: ChatEndpoint,
    requested_model: str | None,
    tokenizer: str | None,
) -> Target:
    """Check reachability, pick the model, choose the prompt source, probe ignore_eos support.

    ``tokenizer``: a folder or hub id; None tries the served model's ``root``
    (vLLM reports the model folder there) and then its id; "none" skips it.
    """
    notes: list[str] = []
    entry = resolve_model(await list_models(http, endpoint), requested_model, endpoint.base_url)
    endpoint.model = entry["id"]

    prompts: PromptSource | None = None
    if tokenizer != "none":
        candidates = [tokenizer] if tokenizer else [c for c in (entry.get("root"), entry.get("id")) if c]
        failures = []
        for candidate in dict.fromkeys(candidates):
            try:
                prompts = TokenizerPrompts(load_tokenizer(candidate), source=candidate)
                break
            except Exception as exc:  # transformers raises many kinds; each is a reason to fall back
                failures.append(f"{candidate}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        if prompts is None:
            if tokenizer:
                raise RuntimeError(f"cannot load tokenizer {failures[0]}")
            notes.append("no tokenizer could be loaded (" + "; ".join(failures) + ")")
    if prompts is None:
        prompts = await calibrate(lambda messages: count_prompt_tokens(http, endpoint, messages))
    notes.append(f"prompt lengths: {prompts.description}")

    if not endpoint.fixed_length_fields:
        notes.append("fixed output length not requested; outputs may stop early at EOS")
        return Target(endpoint=endpoint, prompts=prompts, notes=notes)
    refusal = await probe_fixed_length_support(http, endpoint, chat_messages("Say hi."))
    if refusal is not None:
        endpoint.fixed_length_fields = False
        notes.append(
            f"the server refused ignore_eos/min_tokens ({refusal}); outputs may stop early at EOS: "
            "see the output-token counts per cell"
        )
    else:
        notes.append("fixed output length: ignore_eos + min_tokens accepted")
    return Target(endpoint=endpoint, prompts=prompts, notes=notes)


def _seed(round_index: int, cell_index: int, request_index: int) -> int:
    return round_index * _SEEDS_PER_ROUND + cell_index * _SEEDS_PER_CELL + request_index


async def _run_closed_loop(
    http: httpx.AsyncClient,
    endpoint: ChatEndpoint,
    prompts: list[list[dict[str, str]]],
    concurrency: int,
    max_tokens: int,
    results: list[RequestResult],
    progress: Progress,
) -> None:
    queue = list(reversed(prompts))

    async def worker() -> None:
        while queue:
            messages = queue.pop()
            result = await stream_chat(http, endpoint, messages, max_tokens)
            results.append(result)
            progress.request_done(result)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))


async def run_cell(
    http: httpx.AsyncClient,
    target: Target,
    spec: GridSpec,
    cell: Cell,
    cell_index: int,
    deadline: float,
    round_index: int = 0,
    progress: Progress | None = None,
    keep: list[RequestResult] | None = None,
) -> CellStats:
    """Warm up, then measure one cell; ``keep`` (if given) receives the measured requests."""
    progress = progress or Progress()
    warmup_count = spec.warmup_requests(cell)
    measured_count = spec.measured_requests(cell)
    # Build every prompt before the clock starts: tokenizing is client work.
    seeds = [_seed(round_index, cell_index, i) for i in range(warmup_count + measured_count)]
    messages = [target.prompts.messages(cell.prompt_tokens, seed) for seed in seeds]
    progress.cell_started(cell, warmup_count + measured_count)

    def remaining() -> float:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise DeadlineReached()
        return left

    warmup_results: list[RequestResult] = []
    try:
        async with asyncio.timeout(remaining()):
            await _run_closed_loop(
                http, target.endpoint, messages[:warmup_count], cell.concurrency, cell.output_tokens, warmup_results, progress
            )
    except TimeoutError:
        raise DeadlineReached() from None

    measured: list[RequestResult] = []
    started = time.perf_counter()
    complete = True
    try:
        async with asyncio.timeout(remaining()):
            await _run_closed_loop(
                http, target.endpoint, messages[warmup_count:], cell.concurrency, cell.output_tokens, measured, progress
            )
    except TimeoutError:
        complete = False  # requests cut at the deadline are dropped, not counted as errors
    window = (max(r.end for r in measured) if measured else time.perf_counter()) - started
    if keep is not None:
        keep.extend(measured)
    stats = summarize(cell, measured, window, complete=complete)
    progress.cell_done(stats)
    return stats


async def run_grid(
    http: httpx.AsyncClient,
    target: Target,
    spec: GridSpec,
    deadline: float,
    progress: Progress | None = None,
    round_index: int = 0,
) -> tuple[list[CellStats], list[Cell]]:
    """Measure every cell in order; returns (stats of measured cells, cells skipped at the deadline)."""
    measured: list[CellStats] = []
    cells = spec.cells()
    for index, cell in enumerate(cells):
        try:
            stats = await run_cell(http, target, spec, cell, index, deadline, round_index, progress)
        except DeadlineReached:
            return measured, cells[index:]
        measured.append(stats)
        if not stats.complete:
            return measured, cells[index + 1 :]
    return measured, []
