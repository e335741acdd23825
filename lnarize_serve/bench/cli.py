"""`lnarize-serve bench` (measure one server) and `lnarize-serve bench compare`
(plain vLLM vs lnarize-serve, alternating). Registered in lnarize_serve/cli.py."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_PROMPT_TOKENS = "128,1024"
DEFAULT_OUTPUT_TOKENS = 64


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--concurrency", type=int_list, default=int_list(DEFAULT_CONCURRENCY),
                       help=f"Concurrent streams per cell, comma-separated [default {DEFAULT_CONCURRENCY}].")
    group.add_argument("--prompt-tokens", type=int_list, default=int_list(DEFAULT_PROMPT_TOKENS),
                       help="Prompt lengths in tokens as the server counts them (chat template included), "
                       f"comma-separated [default {DEFAULT_PROMPT_TOKENS}].")
    group.add_argument("--output-tokens", type=positive_int, default=DEFAULT_OUTPUT_TOKENS,
                       help=f"Generated tokens per request; EOS is ignored where the server allows [default {DEFAULT_OUTPUT_TOKENS}].")
    group.add_argument("--requests", type=positive_int, default=None,
                       help="Measured requests per cell [default: max(--min-requests, --waves x concurrency)].")
    group.add_argument("--min-requests", type=positive_int, default=8, help="Lower bound of the default --requests [default 8].")
    group.add_argument("--waves", type=positive_int, default=2, help="Default --requests as a multiple of concurrency [default 2].")
    group.add_argument("--warmup", type=int, default=None,
                       help="Unmeasured warm-up requests at the start of each cell [default: one per stream].")
    group.add_argument("--tokenizer", default=None,
                       help="Tokenizer folder or Hugging Face id for exact prompt lengths [default: the model folder "
                       "the server reports, then the model id]; 'none' calibrates lengths against the server instead.")
    group.add_argument("--max-duration", type=float, default=1800.0,
                       help="Hard bound on the whole run in seconds; cells cut by it are marked and later ones skipped [default 1800].")
    group.add_argument("--request-timeout", type=float, default=600.0, help="Per-request timeout in seconds [default 600].")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", dest="json_path", type=Path, default=None, metavar="PATH",
                       help="Write all results as JSON to PATH ('-' for stdout).")
    group.add_argument("--plot", type=Path, default=None, metavar="PNG",
                       help="Save throughput and TTFT vs concurrency plots to this PNG file.")
    group.add_argument("--no-progress", action="store_true", help="No progress bar (logs, CI).")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Load-test an OpenAI-compatible /v1/chat/completions endpoint with streaming requests over a grid "
        "of concurrency levels and prompt lengths. `lnarize-serve bench compare --help`: plain vLLM vs lnarize-serve."
    )
    parser.add_argument("--base-url", default=None,
                        help="The server's OpenAI base URL, e.g. http://localhost:9000/v1 (a bare host:port gets /v1).")
    parser.add_argument("--model", default=None, help="Model name to request [default: the only one in /v1/models].")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="Bearer token [default: $OPENAI_API_KEY].")
    add_workload_arguments(parser)
    add_output_arguments(parser)
    modes = parser.add_subparsers(dest="mode", metavar="{compare}")
    compare_parser = modes.add_parser(
        "compare", help="Start plain vLLM and lnarize-serve on the same engine settings and compare them A/B.",
    )
    from lnarize_serve.bench.compare_cli import configure_compare

    configure_compare(compare_parser)
    parser.set_defaults(run=run_bench)


def grid_from_args(args: argparse.Namespace):
    from lnarize_serve.bench.driver import GridSpec

    return GridSpec(
        concurrencies=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        requests_per_cell=args.requests,
        min_requests=args.min_requests,
        waves=args.waves,
        warmup_per_cell=args.warmup,
    )


def plot_extra_missing(args: argparse.Namespace, command: str) -> bool:
    """--plot without matplotlib: say so before measuring anything (plain stderr:
    rich markup would eat the `[bench]` of the install command)."""
    if args.plot is None:
        return False
    from lnarize_serve.bench.plot import plot_support_problem

    problem = plot_support_problem()
    if problem:
        print(f"{command}: {problem}", file=sys.stderr)
    return problem is not None


def run_bench(args: argparse.Namespace) -> int:
    from lnarize_serve.bench.report import make_console

    if plot_extra_missing(args, "lnarize-serve bench"):
        return 2
    console = make_console()
    if args.base_url is None:
        console.print("lnarize-serve bench: --base-url is required (e.g. --base-url http://localhost:9000/v1)")
        return 2
    from lnarize_serve.bench.client import ChatEndpoint, normalize_base_url

    try:
        base_url = normalize_base_url(args.base_url)
    except ValueError as exc:
        console.print(f"lnarize-serve bench: {exc}")
        return 2
    endpoint = ChatEndpoint(base_url=base_url, model=args.model or "", api_key=args.api_key,
                            request_timeout=args.request_timeout)
    try:
        return asyncio.run(_bench(console, endpoint, args))
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


async def _bench(console: Console, endpoint, args: argparse.Namespace) -> int:
    from lnarize_serve.bench import report
    from lnarize_serve.bench.client import ServerUnreachable, make_http_client
    from lnarize_serve.bench.driver import prepare_target, run_grid
    from lnarize_serve.bench.progress import progress_bar

    spec = grid_from_args(args)
    deadline = time.perf_counter() + args.max_duration
    async with make_http_client(max(spec.concurrencies), endpoint) as http:
        try:
            target = await prepare_target(http, endpoint, args.model, args.tokenizer)
            for note in target.notes:
                console.print(f"[dim]{note}[/dim]")
            with progress_bar(console, spec.total_requests(), enabled=not args.no_progress) as progress:
                stats, skipped = await run_grid(http, target, spec, deadline, progress)
        except ServerUnreachable as exc:
            console.print(f"[red]lnarize-serve bench: server unreachable: {exc}[/red]")
            return 1
        except RuntimeError as exc:
            console.print(f"[red]lnarize-serve bench: {exc}[/red]")
            return 1

    title = f"{endpoint.model} at {endpoint.base_url}"
    report.print_cells(console, stats, title)
    if skipped:
        console.print(f"[yellow]time bound ({args.max_duration:.0f} s) reached; skipped: "
                      + ", ".join(c.label for c in skipped) + "[/yellow]")
    document = {
        "kind": "lnarize-serve bench",
        "base_url": endpoint.base_url,
        "model": endpoint.model,
        "notes": target.notes,
        "grid": {"concurrency": spec.concurrencies, "prompt_tokens": spec.prompt_tokens,
                 "output_tokens": spec.output_tokens},
        "environment": report.environment(),
        "cells": [s.to_dict() for s in stats],
        "skipped": [c.label for c in skipped],
    }
    if args.json_path is not None:
        report.emit_json(args.json_path, document, console)
    if args.plot is not None:
        from lnarize_serve.bench.plot import plot_series

        try:
            plot_series({endpoint.model: stats}, args.plot, title)
        except RuntimeError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            return 1
        console.print(f"plot: {args.plot}")
    failed = sum(s.errors for s in stats)
    return 1 if failed or skipped or any(not s.complete for s in stats) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lnarize-serve bench")
    configure(parser)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
