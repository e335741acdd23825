"""The two servers `bench compare` measures (started and stopped by `process`).

Both get the same engine settings: the lnarize-serve side is configured by
LNARIZE_* variables; its own `lnarize-serve config --json` (run with exactly
that environment) yields the vLLM engine arguments it will build, and those are
turned into plain vLLM API server flags with vLLM's own argument parser, then
parsed back and checked value by value, so a mismatch stops the run instead of
skewing it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lnarize_serve.bench.process import ServerProcess, ServerStartError, free_port
from lnarize_serve.demo_model import ensure_demo_model
from lnarize_serve.settings import DEMO_MODEL_ID
from lnarize_serve.vllm_compat.choices import PROJECT_TOOL_PARSERS

# Serving-layer settings (not engine arguments) that change what a chat request does.
_SERVING_FLAGS = {
    "LNARIZE_TOOL_CALL_PARSER": "tool_call_parser",
    "LNARIZE_ENABLE_AUTO_TOOL_CHOICE": "enable_auto_tool_choice",
}


@dataclass
class PairPlan:
    """The two servers of a comparison plus the shared engine arguments."""

    vllm: ServerProcess
    lnarize: ServerProcess
    engine_args: dict[str, Any]
    serving: dict[str, Any]


def lnarize_config(env: dict[str, str]) -> dict[str, Any]:
    """What `lnarize-serve config --json` reports under this environment."""
    completed = subprocess.run(
        [sys.executable, "-m", "lnarize_serve", "config", "--json"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    if completed.returncode != 0:
        raise ServerStartError(f"lnarize-serve config failed:\n{completed.stderr.strip()}")
    return json.loads(completed.stdout)


def vllm_flags(values: dict[str, Any], parser: argparse.ArgumentParser) -> list[str]:
    """vLLM API server flags that set ``values`` (AsyncEngineArgs / serving field names)."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    flags: list[str] = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            raise ServerStartError(f"vLLM's API server has no flag for {key!r}")
        if value is None:
            if action.default is not None:
                raise ServerStartError(f"cannot express {key}=None as a vLLM flag (its default is {action.default!r})")
            continue
        # Prefer the flag spelled like the field (--gpu-memory-utilization over an alias).
        preferred = "--" + key.replace("_", "-")
        long_flag = preferred if preferred in action.option_strings else max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):
            positive = next(s for s in action.option_strings if not s.startswith("--no-"))
            flags.append(positive if value else "--no-" + positive[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                flags.append(long_flag)
        elif isinstance(value, dict):
            flags += [long_flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            flags += [long_flag, *[str(v) for v in value]]
        else:
            flags += [long_flag, str(value)]
    return flags


def check_flags(flags: list[str], values: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Parse the flags back with vLLM's parser; every value must come out as asked."""
    parsed = vars(parser.parse_args(flags))
    mismatches = []
    for key, wanted in values.items():
        got = parsed.get(key)
        if isinstance(wanted, list) and isinstance(got, str):
            got = [got]
        if hasattr(got, "model_dump"):
            got = {k: v for k, v in got.model_dump().items() if k in (wanted or {})}
        if got != wanted and not (wanted is None and got in (None, "")):
            mismatches.append(f"{key}: wanted {wanted!r}, vLLM parsed {got!r}")
    if mismatches:
        raise ServerStartError("plain vLLM would not get the same engine settings:\n" + "\n".join(mismatches))


def plan_pair(base_env: dict[str, str], lnarize_env: dict[str, str], logs: Path) -> PairPlan:
    """Describe both servers for one comparison; nothing is started yet."""
    env = {**base_env, **lnarize_env}
    lnarize_port, vllm_port = free_port(), free_port()
    env["LNARIZE_PORT"] = str(lnarize_port)
    env["LNARIZE_HOST"] = "127.0.0.1"
    config = lnarize_config(env)
    engine_args = dict(config["vllm_engine_args"])
    settings = config["settings"]
    if settings.get("LNARIZE_MODEL") == DEMO_MODEL_ID:
        # Plain vLLM starts first and needs the converted folder; `config` only previews it.
        cache_dir = settings.get("LNARIZE_CACHE_DIR")
        engine_args["model"] = str(ensure_demo_model(Path(cache_dir) if cache_dir else None))
    serving = {flag: settings.get(name) for name, flag in _SERVING_FLAGS.items()}
    if not serving.get("tool_call_parser"):
        serving = {"enable_auto_tool_choice": False}
    elif serving["tool_call_parser"] in PROJECT_TOOL_PARSERS:
        module, _ = PROJECT_TOOL_PARSERS[serving["tool_call_parser"]]
        serving["tool_parser_plugin"] = str(Path(importlib.util.find_spec(module).origin))

    from lnarize_serve.vllm_compat.openai import API_SERVER_MODULE, serve_arg_parser

    parser = serve_arg_parser()
    wanted = {**engine_args, **serving}
    model = wanted.pop("model")
    flags = ["--model", model, *vllm_flags(wanted, parser)]
    check_flags(flags, {**wanted, "model": model}, parser)
    vllm_argv = [sys.executable, "-m", API_SERVER_MODULE, *flags,
                 "--host", "127.0.0.1", "--port", str(vllm_port)]
    return PairPlan(
        vllm=ServerProcess("vllm", vllm_argv, dict(base_env), vllm_port, "/health", logs / "vllm.log"),
        lnarize=ServerProcess("lnarize-serve", [sys.executable, "-m", "lnarize_serve", "serve"], env, lnarize_port,
                              "/health/ready", logs / "lnarize-serve.log"),
        engine_args=engine_args,
        serving=serving,
    )
