"""``lnarize-serve`` command line.

Subcommands are registered in ``SUBCOMMANDS`` with one line each:
``"name": ("package.module:configure", "one-line help")``. ``configure`` receives
the subcommand's ``argparse.ArgumentParser``, adds its arguments and sets
``parser.set_defaults(run=callable)`` where ``run(args) -> int`` is the exit code.
Only the chosen subcommand's module is imported, so ``lnarize-serve version``
stays fast and one subcommand's heavy imports never slow another down.
With no subcommand (or only flags) the command is ``serve``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("lnarize_serve.cli_commands:configure_serve", "Start the OpenAI-compatible server (the default)."),
    "config": ("lnarize_serve.cli_commands:configure_config", "Print the effective settings and vLLM engine arguments, then exit."),
    "version": ("lnarize_serve.cli_commands:configure_version", "Print lnarize-serve, vLLM, torch and Python versions."),
    "bench": ("lnarize_serve.bench.cli:configure", "Load-test an OpenAI-compatible server; `bench compare`: vs plain vLLM."),
    "kvtc": ("lnarize_serve.kvtc_tools.cli:configure", "KVTC calibration files: calibrate, inspect, convert, eval."),
    "plan": ("lnarize_serve.plan:configure", "KV cache capacity per cache mode (bf16, fp8, 4-bit, KVTC) and whether a config fits."),
}
DEFAULT_SUBCOMMAND = "serve"


def _top_level_help() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: lnarize-serve [SUBCOMMAND] [options]",
        "",
        "OpenAI-compatible vLLM server for the Qwen3.6 LNARIZE model family.",
        "Settings come from LNARIZE_* environment variables (see `lnarize-serve config --help`).",
        "",
        "subcommands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "`lnarize-serve SUBCOMMAND --help` shows a subcommand's options."]
    return "\n".join(lines)


def build_parser(name: str) -> argparse.ArgumentParser:
    target, help_text = SUBCOMMANDS[name]
    module_name, _, function_name = target.partition(":")
    configure = getattr(importlib.import_module(module_name), function_name)
    parser = argparse.ArgumentParser(prog=f"lnarize-serve {name}", description=help_text)
    configure(parser)
    return parser


def ensure_standard_fds() -> None:
    """Put /dev/null on any of file descriptors 0-2 that is closed (a
    supervisor started us with no stdin, say), so that no file or socket
    opened later takes a standard number: libuv, under uvicorn's loop,
    aborts the process when it closes one (`uv__close: Assertion
    fd > STDERR_FILENO`), which would turn a clean exit 0 into SIGABRT."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_standard_fds()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    if args_list and not args_list[0].startswith("-"):
        name = args_list.pop(0)
        if name not in SUBCOMMANDS:
            print(f"lnarize-serve: unknown subcommand {name!r}\n\n{_top_level_help()}", file=sys.stderr)
            return 2
    else:
        name = DEFAULT_SUBCOMMAND
    parser = build_parser(name)
    parsed = parser.parse_args(args_list)
    run = getattr(parsed, "run", None)
    if run is None:
        parser.error("this subcommand registered no run function")
    return int(run(parsed) or 0)


if __name__ == "__main__":
    sys.exit(main())
