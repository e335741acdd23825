"""Serve a model on a GPU box and measure it, one arm (a set of settings) after another.

    python benchmarks/gpu_serve.py --model /models/qwen36-shaped-nvfp4 \\
        --arm bf16 --arm fp8:LNARIZE_KV_CACHE_DTYPE=fp8 --arm kvtc:LNARIZE_KVTC_ENABLE=1 \\
        --arm vllm --contexts 1024,16384,65536 --streams 4 --out results/

Each arm starts a server (``python -m lnarize_serve serve``; the arm named
``vllm`` starts plain vLLM's API server with exactly the engine arguments
``lnarize-serve config`` reports for the same settings), waits for readiness,
measures, and stops it. Arms run one after another on the same GPU, so their
ratios are side by side in one run. Printed table (Markdown, also in
``OUT/gpu_serve.md``; raw figures in ``OUT/gpu_serve.json``, logs in
``OUT/<arm>.log``):

- start-up: seconds to ready, engine build and warm-up (``lnarize_*`` gauges);
- capacity: vLLM's logged KV cache tokens next to ``lnarize-serve plan``'s
  figure for the same KV memory (exact when ``--kv-cache-bytes`` fixes it);
- the first request after ready (256-token prompt): its decode tok/s beside the
  loads' shows whether a kernel still compiled on a user's request;
- per context and stream count: decode tok/s per stream (median, tokens after
  the first over the time after the first), aggregate decode tok/s (sum over
  the concurrent streams), TTFT (median);
- MTP: draft acceptance and mean tokens per verify step over the arm's requests.

Prompts have exact token lengths (the model's tokenizer renders the chat
template); every request is greedy with ``ignore_eos``, so output lengths are
fixed. With random weights the draft head is random too: acceptance is then
near zero and says nothing about a trained checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lnarize_serve.bench.client import ChatEndpoint, RequestResult, make_http_client, stream_chat
from lnarize_serve.bench.process import ServerProcess, free_port, without_lnarize_settings
from lnarize_serve.bench.servers import plan_pair
from lnarize_serve.bench.workload import TokenizerPrompts, load_tokenizer
from lnarize_serve.kvtc.serving.runtime_config import kvtc_enabled

PLAIN_VLLM_ARM = "vllm"
MTP_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                "vllm:spec_decode_num_accepted_tokens_total")
# vLLM's own start-up lines worth keeping next to the numbers.
LOG_FACTS = {
    "kv_cache_tokens": re.compile(r"KV cache size: ([\d,]+) tokens"),
    "available_kv_gib": re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
    "attention_backend": re.compile(r"Using (\w+) (?:attention )?backend"),
    "cudagraph_mode": re.compile(r"cudagraph_mode['\"]?[:=] ?<?(?:CUDAGraphMode\.)?(\w+)"),
    # vLLM switches the engine core to `spawn` when CUDA was initialised in the
    # server process before the engine started (fork is the default).
    "spawn_forced": re.compile(r"We must use the `spawn` multiprocessing start method.*?Reasons?: ([^\n]*)"),
}
# The KVTC backend's once-per-process line when it first serves decode rows; a
# warm-up with a decode step logs it before the server reports ready.
KVTC_FIRST_DECODE = "KVTC decode path ran"


@dataclass
class Arm:
    name: str
    settings: dict[str, str]

    @property
    def plain_vllm(self) -> bool:
        return self.name == PLAIN_VLLM_ARM


@dataclass
class LoadResult:
    context: int
    streams: int
    decode_tok_s_per_stream: float | None
    aggregate_decode_tok_s: float | None
    ttft_ms: float | None
    errors: list[str] = field(default_factory=list)


@dataclass
class ArmResult:
    arm: str
    settings: dict[str, str]
    ready_s: float | None = None
    phases: list[tuple[float, str]] = field(default_factory=list)
    engine_load_s: float | None = None
    warmup_s: float | None = None
    first_request_tok_s: float | None = None
    kvtc_decode_before_ready: bool | None = None
    log_facts: dict[str, Any] = field(default_factory=dict)
    plan_tokens: int | None = None
    plan_exact: bool = False
    loads: list[LoadResult] = field(default_factory=list)
    mtp: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def parse_arm(text: str) -> Arm:
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("LNARIZE_"):
            raise argparse.ArgumentTypeError(f"arm {name!r}: expected LNARIZE_X=V items, got {item!r}")
        settings[key] = value
    if not name:
        raise argparse.ArgumentTypeError(f"arm needs a name: {text!r}")
    return Arm(name, settings)


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each series over its labels (one engine, one model here)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def read_log_facts(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    facts: dict[str, Any] = {}
    for key, pattern in LOG_FACTS.items():
        found = pattern.findall(text)
        if found:
            facts[key] = found[-1]
    if "kv_cache_tokens" in facts:
        facts["kv_cache_tokens"] = int(facts["kv_cache_tokens"].replace(",", ""))
    return facts


def planner_tokens(env: dict[str, str], kv_bytes: int, arm: Arm) -> int | None:
    """What `lnarize-serve plan` predicts for this arm's cache mode and KV memory."""
    config = json.loads(subprocess.run([sys.executable, "-m", "lnarize_serve", "config", "--json"], env=env,
                                       capture_output=True, text=True, check=True, timeout=300).stdout)
    args = config["vllm_engine_args"]
    if kvtc_enabled(env):
        mode = "kvtc"
    elif str(args.get("kv_cache_dtype", "auto")).startswith("fp8"):
        mode = "fp8"
    else:
        mode = "bf16"
    spec = args.get("speculative_config") or {}
    argv = [sys.executable, "-m", "lnarize_serve", "plan", "--json", "--model", args["model"],
            "--kv-memory", f"{kv_bytes}B", "--max-model-len", str(args["max_model_len"]),
            "--max-num-seqs", str(args["max_num_seqs"]), "--modes", mode,
            "--num-speculative-tokens", str(spec.get("num_speculative_tokens", 0))]
    if args.get("enable_prefix_caching"):
        argv.append("--prefix-caching")
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        print(f"[{arm.name}] plan failed: {completed.stderr.strip()[-400:]}", flush=True)
        return None
    rows = json.loads(completed.stdout)["rows"]
    return rows[0].get("capacity_tokens") if rows else None


class BenchEndpoint(ChatEndpoint):
    """Keeps special tokens in the text: a random-weight model emits many, and a stream whose tokens are
    all stripped carries no text chunk to time."""

    def body(self, messages: list[dict[str, str]], max_tokens: int, stream: bool = True) -> dict[str, Any]:
        return {**super().body(messages, max_tokens, stream), "skip_special_tokens": False}


def decode_rate(result: RequestResult) -> float | None:
    """Tokens after the first over the time from the first chunk to the stream's end.

    The end of the stream rather than the last text chunk: chunks may arrive
    bunched (MTP emits several tokens per step), the end never does.
    """
    if not result.chunk_times or result.output_tokens < 2:
        return None
    span = result.end - result.chunk_times[0]
    return (result.output_tokens - 1) / span if span > 0 else None


async def first_request(endpoint: ChatEndpoint, prompts: TokenizerPrompts, decode_tokens: int) -> RequestResult:
    """The first user request after ready, kept out of the load figures (plain vLLM has no warm-up
    of its own); its decode rate shows whether anything still compiled on a user's request."""
    async with make_http_client(1, endpoint) as client:
        result = await stream_chat(client, endpoint, prompts.messages(256, seed=-7), decode_tokens)
    if not result.ok:
        raise RuntimeError(f"first request failed: {result.error}")
    return result


def exact_prompt(prompts: TokenizerPrompts, context: int, seed: int) -> list[dict[str, str]]:
    """A prompt of exactly ``context`` tokens; a seed whose cut does not converge gives way to the next."""
    for attempt in range(4):
        try:
            return prompts.messages(context, seed + 10_000 * attempt)
        except RuntimeError:
            if attempt == 3:
                raise


async def measure_load(endpoint: ChatEndpoint, prompts: TokenizerPrompts, context: int, streams: int,
                       decode_tokens: int, repeats: int, seed: int) -> LoadResult:
    rates, aggregates, ttfts, errors = [], [], [], []
    async with make_http_client(streams, endpoint) as client:
        for repeat in range(repeats):
            batch = [exact_prompt(prompts, context, seed + repeat * 100 + i) for i in range(streams)]
            results = await asyncio.gather(*(stream_chat(client, endpoint, m, decode_tokens) for m in batch))
            errors += [r.error for r in results if not r.ok]
            ok = [r for r in results if r.ok]
            per_stream = [rate for r in ok if (rate := decode_rate(r)) is not None]
            rates += per_stream
            if len(per_stream) == streams:
                aggregates.append(sum(per_stream))
            ttfts += [r.ttft * 1000 for r in ok if r.ttft is not None]
    median = lambda values: statistics.median(values) if values else None  # noqa: E731
    return LoadResult(context, streams, median(rates), median(aggregates), median(ttfts), errors)


def start_server(arm: Arm, env: dict[str, str], out: Path) -> ServerProcess:
    if arm.plain_vllm:
        lnarize_env = {k: v for k, v in env.items() if k.upper().startswith("LNARIZE_")}
        pair = plan_pair(without_lnarize_settings(env), lnarize_env, out / "plain-vllm")
        server = pair.vllm
        server.log_path = out / f"{arm.name}.log"
    else:
        port = free_port()
        env = dict(env, LNARIZE_HOST="127.0.0.1", LNARIZE_PORT=str(port))
        server = ServerProcess(arm.name, [sys.executable, "-m", "lnarize_serve", "serve"], env, port,
                               "/health/ready", out / f"{arm.name}.log")
    server.start()
    return server


def wait_ready(server: ServerProcess, result: ArmResult, timeout_s: float) -> None:
    """Wait for readiness, recording each phase the probe reports (lnarize-serve)."""

    def record_phase(response: httpx.Response, waited: float) -> None:
        phase = "ready" if response.status_code == 200 else "starting"
        try:
            phase = response.json().get("phase", phase)
        except ValueError:
            pass
        if not result.phases or result.phases[-1][1] != phase:
            result.phases.append((round(waited, 1), phase))

    result.ready_s = round(server.wait_ready(timeout_s, poll_s=0.25, on_response=record_phase), 1)


def run_arm(arm: Arm, base_env: dict[str, str], args: argparse.Namespace, prompts: TokenizerPrompts) -> ArmResult:
    env = {**base_env, **arm.settings}
    result = ArmResult(arm.name, arm.settings)
    server = start_server(arm, env, args.out)
    metrics_url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        wait_ready(server, result, args.start_timeout)
        if kvtc_enabled(env):
            log_at_ready = server.log_path.read_text(errors="replace") if server.log_path.is_file() else ""
            result.kvtc_decode_before_ready = KVTC_FIRST_DECODE in log_at_ready
        startup = parse_metrics(httpx.get(metrics_url, timeout=10).text)
        result.engine_load_s = startup.get("lnarize_engine_load_seconds")
        result.warmup_s = startup.get("lnarize_warmup_seconds")
        result.log_facts = read_log_facts(server.log_path)
        endpoint = BenchEndpoint(base_url=server.base_url, model=args.served_model_name, request_timeout=600)
        first = asyncio.run(first_request(endpoint, prompts, args.decode_tokens))
        result.first_request_tok_s = decode_rate(first)
        before = parse_metrics(httpx.get(metrics_url, timeout=10).text)
        for context in args.contexts:
            for streams in sorted({1, *args.streams}):
                load = asyncio.run(measure_load(endpoint, prompts, context, streams, args.decode_tokens,
                                                args.repeats if streams == 1 else 1, seed=context + streams))
                result.loads.append(load)
                print(f"[{arm.name}] ctx {context} x{streams}: {load.decode_tok_s_per_stream} tok/s/stream, "
                      f"aggregate {load.aggregate_decode_tok_s}, TTFT {load.ttft_ms} ms, errors {len(load.errors)}",
                      flush=True)
        after = parse_metrics(httpx.get(metrics_url, timeout=10).text)
        drafts, draft_tokens, accepted = (after.get(n, 0.0) - before.get(n, 0.0) for n in MTP_COUNTERS)
        if drafts:
            result.mtp = {"drafts": drafts, "acceptance": accepted / draft_tokens if draft_tokens else 0.0,
                          "tokens_per_step": 1 + accepted / drafts}
    except (RuntimeError, httpx.HTTPError) as exc:
        result.error = str(exc)
        print(f"[{arm.name}] FAILED: {exc}", flush=True)
    finally:
        server.stop(grace_s=60)
    result.log_facts = read_log_facts(server.log_path) | result.log_facts
    kv_bytes = args.kv_cache_bytes
    if kv_bytes is None and "available_kv_gib" in result.log_facts:
        kv_bytes = int(float(result.log_facts["available_kv_gib"]) * 2**30)
    if kv_bytes and not arm.plain_vllm and result.error is None:
        result.plan_tokens = planner_tokens(env, kv_bytes, arm)
        result.plan_exact = args.kv_cache_bytes is not None
    return result


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def start_method(result: ArmResult) -> str:
    forced = result.log_facts.get("spawn_forced")
    if forced is not None:
        return f"spawn ({forced.strip()[:60]})"
    return "fork" if result.ready_s is not None else "-"


def markdown(results: list[ArmResult]) -> str:
    lines = ["| arm | ready s | engine s | warm-up s | first request tok/s | vLLM KV tokens | plan tokens | graphs "
             "| engine start | KVTC decode warmed | MTP accept | tok/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        plan = fmt(r.plan_tokens) + ("" if r.plan_exact or r.plan_tokens is None else " (≈)")
        lines.append(f"| {r.arm} | {fmt(r.ready_s)} | {fmt(r.engine_load_s)} | {fmt(r.warmup_s, 2)} | {fmt(r.first_request_tok_s)} | "
                     f"{fmt(r.log_facts.get('kv_cache_tokens'))} | {plan} | {r.log_facts.get('cudagraph_mode', '-')} | "
                     f"{start_method(r)} | {fmt(r.kvtc_decode_before_ready)} | "
                     f"{fmt(r.mtp.get('acceptance'), 3)} | {fmt(r.mtp.get('tokens_per_step'), 2)} |")
    lines += ["", "| arm | context | streams | decode tok/s per stream | aggregate tok/s | TTFT ms | errors |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.arm} | failed: {r.error.splitlines()[0][:120]} | | | | | |")
        for load in r.loads:
            lines.append(f"| {r.arm} | {load.context:,} | {load.streams} | {fmt(load.decode_tok_s_per_stream)} | "
                         f"{fmt(load.aggregate_decode_tok_s)} | {fmt(load.ttft_ms)} | {len(load.errors)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (or repo id) served by every arm")
    parser.add_argument("--served-model-name", default="bench-model")
    parser.add_argument("--arm", dest="arms", type=parse_arm, action="append", required=True,
                        metavar="NAME[:LNARIZE_X=V,...]", help="one server configuration; NAME 'vllm' = plain vLLM")
    parser.add_argument("--set", dest="common", type=lambda s: parse_arm("common:" + s).settings, action="append",
                        default=[], metavar="LNARIZE_X=V,...", help="settings for every arm")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 16384, 65536])
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[4])
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="single-stream repetitions per context")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="fix vLLM's KV memory (kv_cache_memory_bytes) so capacities compare exactly")
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("gpu-serve-results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    base_env = without_lnarize_settings()
    for key in ("LNARIZE_ENGINE_ARGS", "LNARIZE_CACHE_DIR"):
        if key in os.environ:
            base_env[key] = os.environ[key]
    base_env.update(LNARIZE_MODEL=args.model, LNARIZE_SERVED_MODEL_NAME=args.served_model_name,
                    LNARIZE_MAX_MODEL_LEN=str(max(args.contexts) + args.decode_tokens + 64))
    for common in args.common:
        base_env.update(common)
    if args.kv_cache_bytes is not None:
        engine_args = json.loads(base_env.get("LNARIZE_ENGINE_ARGS") or "{}")
        engine_args["kv_cache_memory_bytes"] = args.kv_cache_bytes
        base_env["LNARIZE_ENGINE_ARGS"] = json.dumps(engine_args)
    prompts = TokenizerPrompts(load_tokenizer(args.model), args.model)

    # A SIGTERM (a wall-clock limit) must not leave a server holding the GPU: it runs in its own session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    for arm in args.arms:
        print(f"== arm {arm.name}: {arm.settings or 'base settings'}", flush=True)
        results.append(run_arm(arm, base_env, args, prompts))
        (args.out / "gpu_serve.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    table = markdown(results)
    (args.out / "gpu_serve.md").write_text(table + "\n")
    print(table)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
