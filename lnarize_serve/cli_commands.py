"""The built-in subcommands: serve, config, version (registered in cli.SUBCOMMANDS)."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from lnarize_serve.settings import ConfigError, Settings, env_name, load_settings


def _is_bool_field(annotation: Any) -> bool:
    return annotation is bool


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, help text taken from the field's description."""
    group = parser.add_argument_group("settings (each flag overrides its LNARIZE_* environment variable)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        shown_default = "****" if name == "api_key" else (json.dumps(default) if isinstance(default, dict) else default)
        help_text = f"{field.description} [env {env_name(name)}; default {shown_default}]"
        help_text = help_text.replace("%", "%%")
        if _is_bool_field(field.annotation):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            group.add_argument(flag, dest=name, default=None, choices=choices, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return load_settings(**overrides)


def _load_or_exit(args: argparse.Namespace) -> Settings:
    # Before the settings: validating them imports vLLM, which imports transformers.
    from lnarize_serve.torchvision_guard import torchvision_problem

    problem = torchvision_problem()
    if problem:
        print(f"lnarize-serve: {problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return settings_from_args(args)
    except ConfigError as exc:
        print(f"lnarize-serve: configuration error\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


# serve ---------------------------------------------------------------------------


def configure_serve(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args)
    _check_launch_or_exit(settings)
    from lnarize_serve.server import serve

    return serve(settings)


def _check_launch_or_exit(settings: Settings) -> None:
    """Before the server starts and before any weight download: explicit
    settings the checkpoint contradicts (its config.json from a local folder,
    the cache or the Hub), and the preflight (GPU, architecture, memory plan),
    end the start with exit code 2 (LNARIZE_PREFLIGHT=warn: preflight warns)."""
    from lnarize_serve.engine import model_location_preview, resolve_launch
    from lnarize_serve.preflight import run_preflight

    location = model_location_preview(settings)
    try:
        launch = resolve_launch(settings, location, online=True)
    except ConfigError as exc:
        print(f"lnarize-serve: configuration error\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
    problems = run_preflight(launch, location, online=True)
    if settings.preflight == "warn":
        for problem in problems:
            print(f"lnarize-serve: preflight warning (LNARIZE_PREFLIGHT=warn): {problem}", file=sys.stderr)
        return
    if problems:
        for problem in problems:
            print(f"lnarize-serve: preflight: {problem}", file=sys.stderr)
        raise SystemExit(2)


# config --------------------------------------------------------------------------


def configure_config(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)
    parser.add_argument("--json", action="store_true", help="Print one JSON document instead of text.")
    parser.set_defaults(run=run_config)


def describe_configuration(settings: Settings, probe: Any = None) -> dict[str, Any]:
    from lnarize_serve.engine import model_location_preview, resolve_launch
    from lnarize_serve.engine_args import engine_arg_values

    location = model_location_preview(settings)
    # Offline-safe: the checkpoint's config from the cache, never the Hub.
    launch = resolve_launch(settings, location, online=False, probe=probe)
    engine_values = engine_arg_values(settings, location, launch)
    description = {
        "settings": launch.settings.masked_dump(),
        "launch": launch.describe(),
        "engine": {
            "quantization": engine_values["quantization"] or "auto (from the checkpoint)",
            "speculative_decoding": engine_values["speculative_config"] or "off",
            "cuda_graphs": "off (enforce_eager)" if engine_values["enforce_eager"] else "on",
        },
        "request_defaults": request_defaults(launch),
        "vllm_engine_args": engine_values,
    }
    if launch.settings.kvtc_enable:
        kvtc = describe_kvtc_runtime(launch.settings, location)
        description["kvtc"] = kvtc
        # what the engine arguments will carry: the resolved runtime, or why not yet
        engine_values["additional_config"] = {
            **(engine_values.get("additional_config") or {}),
            "lnarize_kvtc": kvtc.get("runtime") or f"resolved at start-up: {kvtc['unresolved']}",
        }
    return description


def describe_kvtc_runtime(settings: Settings, location: str) -> dict[str, Any]:
    """The KVTC settings the workers will use, by the server's own resolution
    run offline; where that needs a download or conversion, why, in words."""
    from lnarize_serve.engine import with_demo_kvtc_calibration
    from lnarize_serve.kvtc.serving.serving_setup import (
        KVTCSetupError,
        KVTCUnresolvedOffline,
        resolve_kvtc_runtime,
    )

    demo = with_demo_kvtc_calibration(settings, fit=False)
    not_there_yet = None
    if demo is not settings and not Path(demo.kvtc_calibration).is_file():
        not_there_yet = f"the demo model's calibration ({demo.kvtc_calibration}) is fitted at the first start"
    try:
        resolved = resolve_kvtc_runtime(demo, location, online=False, not_there_yet=not_there_yet)
    except KVTCSetupError as exc:
        raise ConfigError(str(exc)) from None
    except KVTCUnresolvedOffline as exc:
        return {"unresolved": str(exc)}
    runtime = resolved.runtime.as_additional_config()["lnarize_kvtc"]
    return {"runtime": runtime, "bytes_per_token_per_kv_head": resolved.calibration.slot_bytes}


def request_defaults(launch: Any) -> dict[str, dict[str, Any]]:
    """What a request gets for what it leaves out, and where each default came from."""
    settings = launch.settings
    shown = {
        "sampling": ("sampling_defaults", settings.sampling_defaults or "none: the checkpoint's generation_config.json"),
        "enable_thinking": ("thinking_default", settings.thinking_default if settings.thinking_default is not None
                            else "the chat template's own default"),
        "chat_template": ("chat_template", settings.chat_template or "the model's own"),
        "thinking_token_budget": ("thinking_token_budget", settings.thinking_token_budget
                                  if settings.thinking_token_budget is not None else "none (no cap)"),
    }
    return {key: {"value": value, "from": launch.origin(name)} for key, (name, value) in shown.items()}


def _env_value(value: Any) -> str:
    """Render a value the way it would be written in an env file."""
    if value is None:
        return ""
    if isinstance(value, bool | dict | list):
        return json.dumps(value)
    return str(value)


def run_config(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args)
    try:
        description = describe_configuration(settings)
    except ConfigError as exc:
        print(f"lnarize-serve: configuration error\n{exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(description, indent=2, default=str))
        return 0
    print("# Effective settings (profile preset + LNARIZE_* environment + flags; secrets masked)")
    for key, value in description["settings"].items():
        print(f"{key}={_env_value(value)}")
    print("\n# Checkpoint family and GPU preset (and what each changed, why)")
    launch = description["launch"]
    print(f"family: {launch['family']}")
    print(f"gpu_profile: {launch['gpu_profile']}")
    for line in launch["choices"]:
        print(f"  {line}")
    print("\n# Engine shape")
    for key, value in description["engine"].items():
        print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    print("\n# Request defaults (a request's own values win)")
    for key, default in description["request_defaults"].items():
        value = default["value"]
        print(f"{key}: {json.dumps(value) if not isinstance(value, str) else value} (from {default['from']})")
    if "kvtc" in description:
        print("\n# KVTC settings as the engine's processes will use them")
        kvtc = description["kvtc"]
        if "unresolved" in kvtc:
            print(f"not resolved offline: {kvtc['unresolved']}")
        else:
            for key, value in kvtc["runtime"].items():
                print(f"{key}: {value}")
            print(f"bytes_per_token_per_kv_head: {kvtc['bytes_per_token_per_kv_head']}")
    print("\n# vLLM AsyncEngineArgs these settings produce")
    print(json.dumps(description["vllm_engine_args"], indent=2, default=str))
    return 0


# version -------------------------------------------------------------------------


def configure_version(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(run=run_version)


def run_version(args: argparse.Namespace) -> int:
    import platform

    from lnarize_serve import __version__

    versions = {"lnarize-serve": __version__, "python": platform.python_version()}
    for module_name in ("vllm", "torch"):
        try:
            module = __import__(module_name)
            versions[module_name] = getattr(module, "__version__", "unknown")
        except ImportError:
            versions[module_name] = "not installed"
    for key, value in versions.items():
        print(f"{key} {value}")
    return 0
