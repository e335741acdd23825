"""``lnarize-serve kvtc calibrate | inspect | convert | eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    """Entry for lnarize_serve.cli's SUBCOMMANDS table."""
    add_kvtc_commands(parser.add_subparsers(dest="kvtc_command", metavar="COMMAND", required=True))


def add_kvtc_commands(subparsers: Any) -> None:
    calibrate = subparsers.add_parser(
        "calibrate", help="Fit a KVTC calibration for a model over the offline corpus.")
    _model_args(calibrate)
    calibrate.add_argument("--out", required=True, help="Output .safetensors file.")
    # K3V3: the better 48-byte split measured on SmolLM2 (docs/kvtc-eval.md)
    _budget_args(calibrate, default_key=3.0, default_value=3.0)
    _fit_args(calibrate)
    calibrate.set_defaults(run=run_calibrate)

    inspect = subparsers.add_parser(
        "inspect", help="Summarise a calibration file (ours or the shipped kvtc_calibration.pt).")
    inspect.add_argument("path", help="A .safetensors calibration or a shipped .pt file.")
    inspect.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    inspect.set_defaults(run=run_inspect)

    convert = subparsers.add_parser(
        "convert", help="Convert the shipped kvtc_calibration.pt into our format.")
    convert.add_argument("shipped", help="Path of kvtc_calibration.pt (loaded safely).")
    convert.add_argument("--model-config", required=True,
                         help="The model's config.json, or a folder that holds it.")
    convert.add_argument("--model-id", default=None, help="Recorded in the metadata.")
    convert.add_argument("--out", required=True, help="Output .safetensors file.")
    _budget_args(convert, default_key=None, default_value=None)
    convert.add_argument("--positions", type=int, default=4096,
                         help="Positions to average the shipped pre-RoPE key statistics over.")
    convert.set_defaults(run=run_convert)

    evaluate = subparsers.add_parser(
        "eval", help="Quality per byte of KVTC vs bf16/fp8/int4/TurboQuant-like on a real model.")
    _model_args(evaluate)
    evaluate.add_argument("--out-dir", default="bench-results/kvtc",
                          help="Where the table (.md), JSON and PNG go.")
    evaluate.add_argument("--contexts", type=int, default=8, help="Held-out contexts.")
    evaluate.add_argument("--context-len", type=int, default=1024, help="Compressed context tokens.")
    evaluate.add_argument("--continuation-len", type=int, default=64,
                          help="Teacher-forced continuation tokens scored per context.")
    evaluate.add_argument("--budgets", default="2:3,2:4,2.5:3.5,3:3,3:4,4:4",
                          help="KVTC budgets as key_bits:value_bits per dim, comma separated.")
    evaluate.add_argument("--calibration", default=None,
                          help="Evaluate this calibration file instead of fitting the budgets.")
    evaluate.add_argument("--policies", default="4:0,4:128",
                          help="Exact-token policies sinks:window, comma separated; every "
                               "method is scored under each.")
    evaluate.add_argument("--no-ablations", action="store_true",
                          help="Skip the sinks/window and weighting ablations.")
    _fit_args(evaluate)
    evaluate.set_defaults(run=run_eval)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF model folder (default: the SmolLM2 demo model, converted once).")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda if present).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared box more threads spin and crawl).")


def _budget_args(parser: argparse.ArgumentParser, default_key: float | None,
                 default_value: float | None) -> None:
    parser.add_argument("--key-bits", type=float, default=default_key,
                        help="Key bits per head dim (slot part rounded up to 4-byte words).")
    parser.add_argument("--value-bits", type=float, default=default_value,
                        help="Value bits per head dim.")


def _fit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequences", type=int, default=24, help="Calibration sequences.")
    parser.add_argument("--length", type=int, default=512, help="Tokens per calibration sequence.")
    parser.add_argument("--skip-tokens", type=int, default=4,
                        help="Leading (sink) tokens left out of the statistics.")
    parser.add_argument("--max-samples", type=int, default=2048,
                        help="Vectors per layer used to measure quantizer errors.")
    parser.add_argument("--no-weighting", action="store_true",
                        help="Allocate bits on plain MSE (no query/output weighting).")


def _setup(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    from lnarize_serve.kvtc_tools.calibrate import default_device

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, args.threads))
    device = default_device() if args.device == "auto" else args.device
    if args.model:
        return args.model, device
    from lnarize_serve.demo_model import ensure_demo_model

    return str(ensure_demo_model()), device


def _fit_options(args: argparse.Namespace, key_bits: float = 2.0, value_bits: float = 4.0):
    from lnarize_serve.kvtc_tools.calibrate import FitOptions

    return FitOptions(key_bits_per_dim=key_bits, value_bits_per_dim=value_bits,
                      num_sequences=args.sequences, sequence_length=args.length,
                      sink_tokens=args.skip_tokens, max_samples=args.max_samples,
                      query_weighted_keys=not args.no_weighting,
                      output_weighted_values=not args.no_weighting)


def run_calibrate(args: argparse.Namespace) -> int:
    from lnarize_serve.kvtc_tools.calibrate import fit_calibration, load_model

    model_dir, device = _setup(args)
    model, tokenizer = load_model(model_dir, device)
    calibration = fit_calibration(model, tokenizer, Path(model_dir).name,
                                  _fit_options(args, args.key_bits, args.value_bits))
    path = calibration.save(args.out)
    print(f"wrote {path}: {len(calibration.layers)} layers x {calibration.num_kv_heads} KV heads, "
          f"{calibration.key_bytes}+{calibration.value_bytes} bytes "
          f"(slot {calibration.slot_bytes}, bf16 {4 * calibration.head_dim})")
    return 0


def describe_file(path: str) -> dict[str, Any]:
    from lnarize_serve.kvtc.format.calibration import read_metadata
    from lnarize_serve.kvtc.format.shipped import describe_shipped, load_shipped

    if path.endswith(".pt"):
        return {"format": "shipped kvtc_calibration.pt", **describe_shipped(load_shipped(path))}
    meta = read_metadata(path)
    ranks = {}
    for layer, kinds in meta["bit_allocation"].items():
        ranks[layer] = {kind: [len(widths) for widths in heads] for kind, heads in kinds.items()}
    widths = Counter(w for kinds in meta["bit_allocation"].values() for heads in kinds.values()
                     for head in heads for w in head)
    summary = {k: meta[k] for k in ("format", "format_version", "layout_version", "model_id",
                                    "head_dim", "num_kv_heads", "layer_map", "rotary", "key_bytes",
                                    "value_bytes", "slot_bytes", "sink_tokens", "window_tokens",
                                    "source")}
    summary["compression_vs_bf16"] = round(4 * meta["head_dim"] / meta["slot_bytes"], 2)
    summary["components_kept_per_head"] = ranks
    summary["width_histogram"] = dict(sorted(widths.items()))
    return summary


def run_inspect(args: argparse.Namespace) -> int:
    from lnarize_serve.kvtc.format.calibration import CalibrationError

    try:
        summary = describe_file(args.path)
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key, value in summary.items():
        if key == "components_kept_per_head":
            print("components kept per head (keys | values):")
            for layer, kinds in value.items():
                print(f"  layer {layer:>3}: {kinds['keys']} | {kinds['values']}")
        else:
            print(f"{key}: {value}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from lnarize_serve.hf_config import AttentionGeometry
    from lnarize_serve.kvtc.format.calibration import CalibrationError
    from lnarize_serve.kvtc.format.shipped import convert_shipped, load_shipped

    config_path = Path(args.model_config)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    try:
        geometry = AttentionGeometry.from_config(json.loads(config_path.read_text()))
        shipped = load_shipped(args.shipped)
        calibration = convert_shipped(shipped, geometry, args.model_id or config_path.parent.name,
                                      args.key_bits, args.value_bits, args.positions)
    except (CalibrationError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = calibration.save(args.out)
    print(f"wrote {path}: layers {calibration.layer_indices}, "
          f"{calibration.key_bytes}+{calibration.value_bytes} bytes per token per KV head")
    return 0


def parse_budgets(text: str) -> tuple[tuple[float, float], ...]:
    budgets = []
    for item in text.split(","):
        key, _, value = item.partition(":")
        try:
            budgets.append((float(key), float(value)))
        except ValueError:
            raise SystemExit(f"--budgets: {item!r} is not key_bits:value_bits") from None
    return tuple(budgets)


def run_eval(args: argparse.Namespace) -> int:
    from lnarize_serve.kvtc_tools.benchmark import BenchmarkOptions, run_benchmark

    model_dir, device = _setup(args)
    options = BenchmarkOptions(
        model_dir=model_dir, out_dir=args.out_dir, contexts=args.contexts,
        context_len=args.context_len, continuation_len=args.continuation_len,
        budgets=parse_budgets(args.budgets), calibration=args.calibration,
        policies=tuple((int(a), int(b)) for a, b in parse_budgets(args.policies)),
        ablate_exact_tokens=not args.no_ablations,
        ablate_weighting=not args.no_ablations and not args.no_weighting, device=device,
        fit=_fit_options(args))
    report = run_benchmark(options)
    print(report["table"])
    print(f"\nreference continuation perplexity (fp32, uncompressed): "
          f"{report['results'][0]['ppl_ref']:.3f}; {report['sequences']} contexts; "
          f"{report['seconds']:.0f}s; plot and JSON in {args.out_dir}")
    return 0
