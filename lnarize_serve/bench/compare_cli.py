"""`lnarize-serve bench compare`: plain vLLM (A) vs lnarize-serve (B), same engine, alternating load.

Why both servers stay up and only the load alternates (instead of restarting
one server per measurement): a CPU engine start costs 30-120 s here, so
restarts would eat most of a bounded run and leave few A/B pairs; an idle
server costs ~nothing (vLLM's worker parks on a socket after ~1 s of
busy-polling, and the settle pause covers that; the idle arm's CPU seconds are
measured and printed for every cell, so this is checked, not assumed); and
keeping the same two engine instances means round-to-round differences are load
noise, not start-to-start differences in memory layout or thread placement.
Memory is not a constraint (two ~2 GB processes trees with a 1 GiB KV cache each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lnarize_serve.bench.cli import add_output_arguments, add_workload_arguments, grid_from_args, plot_extra_missing

VLLM_ARM = "vllm"
LNARIZE_ARM = "lnarize-serve"


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.startswith("LNARIZE_"):
        raise argparse.ArgumentTypeError(f"expected LNARIZE_NAME=value, got {text!r}")
    return key, value


def configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Start plain vLLM's API server (as `vllm serve` runs it) and lnarize-serve on the same model and "
        "engine settings, measure them alternately (A B, B A, ...) and report per-cell ratios with their spread. "
        "Engine settings come from LNARIZE_* (profile + --set); plain vLLM gets the exact engine arguments "
        "`lnarize-serve config` reports for them."
    )
    group = parser.add_argument_group("servers")
    group.add_argument("--profile", default="cpu-demo", help="LNARIZE_PROFILE for both servers [default cpu-demo].")
    group.add_argument("--set", dest="assignments", type=_assignment, action="append", default=[], metavar="LNARIZE_X=V",
                       help="Extra setting for both servers (repeatable), e.g. --set LNARIZE_DTYPE=float32.")
    group.add_argument("--kv-cache-gib", type=float, default=1.0,
                       help="VLLM_CPU_KVCACHE_SPACE for both (CPU engine only) [default 1].")
    group.add_argument("--rounds", type=int, default=2, help="A/B rounds; the order flips every round [default 2].")
    group.add_argument("--settle", type=float, default=2.0,
                       help="Pause before each arm so the other server's post-request spin ends [default 2 s].")
    group.add_argument("--start-timeout", type=float, default=600.0, help="Seconds each server may take to become ready.")
    group.add_argument("--logs", type=Path, default=None, help="Folder for the two server logs [default: a temp folder].")
    group.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                       help="Also write the comparison table as Markdown (for docs).")
    add_workload_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(run=run_compare)


def _environments(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    base = dict(os.environ)
    base.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gib:g}")
    base["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    base.setdefault("VLLM_NO_USAGE_STATS", "1")
    lnarize = {"LNARIZE_PROFILE": args.profile}
    # Enough engine slots that the highest concurrency really runs in parallel.
    if not any(key == "LNARIZE_MAX_NUM_SEQS" for key, _ in args.assignments):
        lnarize["LNARIZE_MAX_NUM_SEQS"] = str(max(args.concurrency))
    lnarize.update(dict(args.assignments))
    return base, lnarize


def run_compare(args: argparse.Namespace) -> int:
    from lnarize_serve.bench.report import make_console

    if plot_extra_missing(args, "lnarize-serve bench compare"):
        return 2
    console = make_console()
    if args.rounds < 1:
        console.print("lnarize-serve bench compare: --rounds must be >= 1")
        return 2
    from lnarize_serve.vllm_compat import VllmVersionError, check_vllm_version

    try:
        check_vllm_version()
    except VllmVersionError as exc:
        console.print(f"lnarize-serve bench compare: {exc}")
        return 2
    from lnarize_serve.bench.process import ServerStartError
    from lnarize_serve.bench.servers import plan_pair

    base_env, lnarize_env = _environments(args)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="lnarize-bench-"))
    deadline = time.perf_counter() + args.max_duration
    try:
        plan = plan_pair(base_env, lnarize_env, logs)
    except ServerStartError as exc:
        console.print(f"[red]lnarize-serve bench compare: {exc}[/red]")
        return 1
    console.print(f"engine arguments (both servers): {plan.engine_args}")
    console.print(f"serving flags (both servers): {plan.serving}")
    console.print(f"plain vLLM: {' '.join(plan.vllm.argv[1:])}")
    console.print(f"logs: {logs}")
    servers = (plan.vllm, plan.lnarize)
    try:
        # One at a time: two engines loading at once would slow both starts.
        for server in servers:
            server.start()
            waited = server.wait_ready(min(args.start_timeout, max(1.0, deadline - time.perf_counter())))
            console.print(f"{server.name} ready after {waited:.0f} s on port {server.port}")
        return asyncio.run(_measure(console, args, plan, deadline))
    except ServerStartError as exc:
        console.print(f"[red]lnarize-serve bench compare: {exc}[/red]")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        for server in servers:
            server.stop()


async def _measure(console: Console, args: argparse.Namespace, plan, deadline: float) -> int:
    from lnarize_serve.bench import report
    from lnarize_serve.bench.client import ChatEndpoint, ServerUnreachable, make_http_client
    from lnarize_serve.bench.compare import Arm, compare_cells, run_alternating
    from lnarize_serve.bench.driver import prepare_target
    from lnarize_serve.bench.progress import progress_bar

    spec = grid_from_args(args)
    api_key = lnarize_api_key(plan)
    endpoints = {
        VLLM_ARM: ChatEndpoint(plan.vllm.base_url, "", None, request_timeout=args.request_timeout),
        LNARIZE_ARM: ChatEndpoint(plan.lnarize.base_url, "", api_key, request_timeout=args.request_timeout),
    }
    concurrency = max(spec.concurrencies)
    async with make_http_client(concurrency, endpoints[VLLM_ARM]) as http_a, \
            make_http_client(concurrency, endpoints[LNARIZE_ARM]) as http_b:
        try:
            target_a = await prepare_target(http_a, endpoints[VLLM_ARM], None, args.tokenizer)
            target_b = await prepare_target(http_b, endpoints[LNARIZE_ARM], None, args.tokenizer)
        except (ServerUnreachable, RuntimeError) as exc:
            console.print(f"[red]lnarize-serve bench compare: {exc}[/red]")
            return 1
        for name, target in ((VLLM_ARM, target_a), (LNARIZE_ARM, target_b)):
            for note in target.notes:
                console.print(f"[dim]{name}: {note}[/dim]")
        arms = (
            Arm(VLLM_ARM, http_a, target_a, plan.vllm.cpu_seconds, plan.vllm.frontend_cpu_seconds),
            Arm(LNARIZE_ARM, http_b, target_b, plan.lnarize.cpu_seconds, plan.lnarize.frontend_cpu_seconds),
        )
        lines: list[str] = []

        def on_measured(m) -> None:
            idle = "" if m.other_arm_cpu_s is None else f", idle arm used {m.other_arm_cpu_s:.2f} CPU s"
            if m.frontend_cpu_ms_per_request is not None:
                idle += f", API process {m.frontend_cpu_ms_per_request:.1f} CPU ms/request"
            line = (f"round {m.round_index} {m.arm:>13} c={m.stats.concurrency:<3} p={m.stats.prompt_tokens:<5} "
                    f"{m.stats.output_tok_s:8.1f} tok/s  TTFT p50 {m.stats.ttft_ms_p50 or float('nan'):8.1f} ms"
                    f"  window {m.stats.window_s:6.1f} s{idle}")
            lines.append(line)
            console.print(line)

        total = spec.total_requests() * 2 * args.rounds
        with progress_bar(console, total, enabled=not args.no_progress) as progress:
            try:
                measurements, finished = await run_alternating(
                    arms, spec, args.rounds, deadline, args.settle, progress, on_measured
                )
            except ServerUnreachable as exc:
                console.print(f"[red]lnarize-serve bench compare: a server went away: {exc}[/red]")
                return 1

    comparisons = compare_cells(measurements, VLLM_ARM, LNARIZE_ARM)
    console.print(comparison_table(comparisons))
    if not finished:
        console.print(f"[yellow]time bound ({args.max_duration:.0f} s) reached before all rounds finished; "
                      "only complete A/B pairs are compared[/yellow]")
    idle = [m.other_arm_cpu_s for m in measurements if m.other_arm_cpu_s is not None]
    windows = [m.stats.window_s for m in measurements]
    if idle:
        console.print(f"idle arm CPU during measurements: {sum(idle):.1f} CPU s over {sum(windows):.0f} s of "
                      f"measurement windows (max {max(idle):.2f} s in one cell)")
    document = {
        "kind": "lnarize-serve bench compare",
        "a": VLLM_ARM,
        "b": LNARIZE_ARM,
        "engine_args": plan.engine_args,
        "serving_flags": plan.serving,
        "vllm_argv": plan.vllm.argv[1:],
        "lnarize_env": {k: v for k, v in plan.lnarize.env.items() if k.startswith("LNARIZE_") and k != "LNARIZE_API_KEY"},
        "grid": {"concurrency": spec.concurrencies, "prompt_tokens": spec.prompt_tokens,
                 "output_tokens": spec.output_tokens, "rounds": args.rounds},
        "notes": {VLLM_ARM: target_a.notes, LNARIZE_ARM: target_b.notes},
        "environment": report.environment(),
        "finished": finished,
        "comparisons": [c.to_dict() for c in comparisons],
        "measurements": [
            {"arm": m.arm, "round": m.round_index, "order": m.order, "idle_arm_cpu_s": m.other_arm_cpu_s,
             "frontend_cpu_ms_per_request": m.frontend_cpu_ms_per_request, **m.stats.to_dict()}
            for m in measurements
        ],
    }
    if args.json_path is not None:
        report.emit_json(args.json_path, document, console)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(comparison_markdown([c.to_dict() for c in comparisons]))
        console.print(f"Markdown: {args.markdown}")
    if args.plot is not None:
        from lnarize_serve.bench.plot import plot_series

        series = {VLLM_ARM: [c.pooled_a for c in comparisons], LNARIZE_ARM: [c.pooled_b for c in comparisons]}
        plot_series(series, args.plot, "plain vLLM vs lnarize-serve (pooled over rounds)")
        console.print(f"plot: {args.plot}")
    errors = sum(m.stats.errors for m in measurements)
    return 0 if finished and not errors and comparisons else 1


def lnarize_api_key(plan) -> str | None:
    return plan.lnarize.env.get("LNARIZE_API_KEY") or None


def _spread_text(values: list[float], fmt: str) -> str:
    from lnarize_serve.bench.compare import spread

    summary = spread(values)
    if summary is None:
        return "-"
    median, low, high = summary
    if len(values) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} [{format(low, fmt)}, {format(high, fmt)}]"


def comparison_table(comparisons) -> Table:
    title = escape("lnarize-serve vs plain vLLM (per-round values: median [min, max])")
    table = Table(title=title, title_justify="left")
    for name in ("conc", "prompt", "rounds", "vLLM tok/s", "ours tok/s", "ratio pooled", "ratio per round",
                 "vLLM TTFT p50", "ours TTFT p50", "dTTFT pooled", "dTTFT per round", "dITL p50", "vLLM CV",
             "API CPU ms/req vLLM", "ours"):
        table.add_column(name, justify="right")
    for c in comparisons:
        diff = c.pooled_ttft_p50_diff_ms
        table.add_row(
            str(c.cell.concurrency),
            str(c.cell.prompt_tokens),
            str(c.rounds),
            f"{c.pooled_a.output_tok_s:.1f}",
            f"{c.pooled_b.output_tok_s:.1f}",
            f"{c.pooled_throughput_ratio:.3f}",
            _spread_text(c.throughput_ratios, ".3f"),
            f"{c.pooled_a.ttft_ms_p50:.1f}" if c.pooled_a.ttft_ms_p50 is not None else "-",
            f"{c.pooled_b.ttft_ms_p50:.1f}" if c.pooled_b.ttft_ms_p50 is not None else "-",
            "-" if diff is None else f"{diff:+.1f}",
            _spread_text(c.ttft_p50_diffs_ms, "+.1f"),
            _spread_text(c.itl_p50_diffs_ms, "+.2f"),
            "-" if c.a_throughput_cv is None else f"{100 * c.a_throughput_cv:.1f}%",
            "-" if c.frontend_cpu_ms_a is None else f"{c.frontend_cpu_ms_a:.1f}",
            "-" if c.frontend_cpu_ms_b is None else f"{c.frontend_cpu_ms_b:.1f}",
        )
    table.caption = ("ratio = lnarize-serve / vLLM output tok/s; dTTFT = lnarize-serve - vLLM (ms); "
                     "vLLM CV = round-to-round variation of vLLM's own throughput (the noise floor); "
                     "API CPU = CPU time of the HTTP/API process per request (the wrapper's own cost)")
    return table


def comparison_markdown(comparisons: list[dict]) -> str:
    """The comparison (``CellComparison.to_dict()`` rows, as in the JSON) as a Markdown table."""
    header = ("| conc | prompt | rounds | vLLM out tok/s | ours out tok/s | ratio (pooled) | ratio per round "
              "| vLLM TTFT p50 ms | ours TTFT p50 ms | dTTFT p50 ms (pooled) | dTTFT per round | dITL p50 ms per round "
              "| vLLM round-to-round CV | API CPU ms/req vLLM | API CPU ms/req ours |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in comparisons:
        a, b = c["a"], c["b"]
        cells = [
            str(c["concurrency"]), str(c["prompt_tokens"]), str(c["rounds"]),
            f"{a['output_tok_s']:.1f}", f"{b['output_tok_s']:.1f}",
            f"{c['throughput_ratio_pooled']:.3f}", _spread_text(c["throughput_ratio_per_round"], ".3f"),
            _optional(a["ttft_ms_p50"], ".0f"), _optional(b["ttft_ms_p50"], ".0f"),
            _optional(c["ttft_p50_diff_ms_pooled"], "+.1f"), _spread_text(c["ttft_p50_diff_ms_per_round"], "+.0f"),
            _spread_text(c["itl_p50_diff_ms_per_round"], "+.1f"),
            _optional(None if c["a_throughput_cv"] is None else 100 * c["a_throughput_cv"], ".0f") + "%",
            _optional(c.get("frontend_cpu_ms_per_request_a"), ".1f"),
            _optional(c.get("frontend_cpu_ms_per_request_b"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _optional(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
