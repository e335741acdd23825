"""The KVTC quality-per-byte benchmark (``lnarize-serve kvtc eval`` and
benchmarks/kvtc_eval.py): calibrate on one part of the corpus, evaluate every
method on held-out contexts, print a table, save a PNG and a JSON."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lnarize_serve.kvtc_tools.baselines import baseline_methods, kvtc_method
from lnarize_serve.kvtc_tools.calibrate import (FitOptions, calibration_at_budget, load_model,
                                                measure_model)
from lnarize_serve.kvtc.format.calibration import load_calibration
from lnarize_serve.kvtc_tools.corpus import token_sequences
from lnarize_serve.kvtc_tools.evaluate import ExactTokens, evaluate_methods, format_table, save_plot

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = ((2.0, 3.0), (2.0, 4.0), (2.5, 3.5), (3.0, 3.0), (3.0, 4.0), (4.0, 4.0))
# (sinks, window) policies of the main table: the first 4 tokens exact (needed,
# see docs/kvtc-layout.md), with and without a 128-token exact window
DEFAULT_POLICIES = ((4, 0), (4, 128))


@dataclass
class BenchmarkOptions:
    model_dir: str
    out_dir: str = "bench-results/kvtc"
    contexts: int = 8
    context_len: int = 1024
    continuation_len: int = 64
    budgets: tuple[tuple[float, float], ...] = DEFAULT_BUDGETS
    calibration: str | None = None      # evaluate this file instead of fitting budgets
    policies: tuple[tuple[int, int], ...] = DEFAULT_POLICIES  # (sinks, window) per table block
    ablate_exact_tokens: bool = True    # no-sink policies for KVTC K2V4 and int4
    ablate_weighting: bool = True       # K2V4 without query/output weighting
    device: str = "cpu"
    fit: FitOptions = field(default_factory=FitOptions)


def _label(key_bits: float, value_bits: float) -> str:
    return f"KVTC K{key_bits:g}V{value_bits:g}"


def run_benchmark(options: BenchmarkOptions) -> dict:
    started = time.monotonic()
    model, tokenizer = load_model(options.model_dir, options.device)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    baselines = baseline_methods(head_dim)
    kvtc: list = []
    k2v4 = None
    if options.calibration:
        calibration = load_calibration(options.calibration)
        kvtc.append(kvtc_method(calibration, f"KVTC ({Path(options.calibration).name})"))
        k2v4 = kvtc[-1]
    else:
        measurements = measure_model(model, tokenizer, options.fit)
        logger.info("calibration measured in %.0fs", time.monotonic() - started)
        for key_bits, value_bits in options.budgets:
            calibration = calibration_at_budget(measurements, options.model_dir, key_bits,
                                                value_bits, options.fit)
            kvtc.append(kvtc_method(calibration, _label(key_bits, value_bits)))
            if (key_bits, value_bits) == (2.0, 4.0):
                k2v4 = kvtc[-1]
                if options.ablate_weighting:
                    plain = calibration_at_budget(measurements, options.model_dir, 2.0, 4.0,
                                                  options.fit, use_weights=False)
                    kvtc.append(kvtc_method(plain, "KVTC K2V4 unweighted"))
    methods = []
    for sinks, window in options.policies:
        policy = ExactTokens(sinks, window)
        methods += [(m, policy) for m in sorted(baselines + kvtc,
                                                key=lambda m: -m.bytes_per_token_head)]
    if options.ablate_exact_tokens:
        int4 = baselines[2]
        for policy in (ExactTokens(0, 0), ExactTokens(0, 128)):
            if (policy.sinks, policy.window) in options.policies:
                continue
            if k2v4 is not None:
                methods.append((k2v4, policy))
            methods.append((int4, policy))
    sequences = list(token_sequences(tokenizer, "eval",
                                     options.context_len + options.continuation_len,
                                     options.contexts))
    if len(sequences) < options.contexts:
        logger.warning("only %d held-out sequences long enough", len(sequences))
    results = evaluate_methods(model, sequences, options.context_len, methods)
    table = format_table(results, bf16_bytes=4 * head_dim)
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"KVTC vs KV quantizers, SmolLM2-135M, {len(sequences)} x {options.context_len} "
             f"ctx + {options.continuation_len} cont.")
    save_plot(results, str(out / "kvtc_quality_vs_bytes.png"), title)
    report = {
        "settings": {k: v for k, v in asdict(options).items() if k != "fit"},
        "fit": asdict(options.fit), "sequences": len(sequences), "head_dim": head_dim,
        "seconds": round(time.monotonic() - started, 1),
        "results": [dict(name=r.name, exact=asdict(r.exact), bytes=r.bytes_per_token_head,
                         kl=r.kl, top1=r.top1, ppl=r.ppl, ppl_ref=r.ppl_ref,
                         ppl_delta=r.ppl_delta,
                         layer_rel_error={str(k): v for k, v in r.layer_rel_error.items()})
                    for r in results],
        "table": table,
    }
    (out / "kvtc_eval.json").write_text(json.dumps(report, indent=2))
    (out / "kvtc_eval.md").write_text(table + "\n")
    return report


def default_threads() -> int:
    # the CI/dev box is shared; two threads is what one job may take
    return min(2, torch.get_num_threads())
