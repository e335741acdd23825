"""Run the same prompts through vLLM with and without KVTC and compare.

Used by ``benchmarks/kvtc_vllm.py`` (the measurements) and the integration
tests. Engines are vLLM ``LLM`` objects built in this process (their engine
core and workers are spawned processes: the KVTC plugin loads there when
``LNARIZE_KVTC_ENABLE`` is on in their inherited environment, and the backend
reads its settings from the engine's ``additional_config``).

Quality is measured where compression matters: every prompt is longer than
a prefill chunk's reach (chunked prefill, so later chunks read earlier ones
compressed), and every generated token is decoded over the compressed cache.
- greedy agreement: tokens of the KVTC continuation equal to the
  uncompressed engine's, up to the first divergence and overall;
- top-1 agreement: the uncompressed engine scores the KVTC continuation
  (prompt_logprobs, teacher-forced on the same prefixes); the fraction of
  positions where its top-1 token is the token KVTC chose.
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lnarize_serve.kvtc.serving.runtime_config import ENABLE_VAR, KVTCRuntimeConfig


@dataclass
class EngineRun:
    label: str
    capacity_tokens: int
    start_seconds: float
    outputs: list[list[int]] = field(default_factory=list)
    generate_seconds: float = 0.0
    generated_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


def kvtc_runtime(calibration_path: str, sink_tokens: int | None = None,
                 window_tokens: int | None = None) -> KVTCRuntimeConfig:
    """The runtime settings; unset sink/window mean what they mean to the server."""
    if sink_tokens is None:
        from lnarize_serve.kvtc.format.calibration import load_calibration
        from lnarize_serve.kvtc.serving.serving_setup import resolve_sink_tokens

        sink_tokens = resolve_sink_tokens(None, load_calibration(calibration_path))
    if window_tokens is None:
        from lnarize_serve.settings import Settings

        window_tokens = Settings.model_fields["kvtc_window_tokens"].default
    return KVTCRuntimeConfig(calibration_path, sink_tokens, window_tokens)


@contextmanager
def kvtc_plugin_switch(enabled: bool):
    """Switch the plugin on (or off) for the engine processes spawned inside."""
    saved = os.environ.get(ENABLE_VAR)
    os.environ[ENABLE_VAR] = "1" if enabled else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENABLE_VAR, None)
        else:
            os.environ[ENABLE_VAR] = saved


def build_llm(model: str, calibration_path: str | None, sink_tokens: int | None = None,
              window_tokens: int | None = None, **engine_kwargs: Any):
    from lnarize_serve.vllm_compat.offline import LLM

    # stats on: speculative-decoding counters come from vLLM's stat loggers
    kwargs = dict(enforce_eager=True, max_model_len=2048, max_num_seqs=8, seed=0,
                  disable_log_stats=False)
    kwargs.update(engine_kwargs)
    if calibration_path:
        kwargs["attention_backend"] = "CUSTOM"
        runtime = kvtc_runtime(calibration_path, sink_tokens, window_tokens)
        kwargs["additional_config"] = {**(kwargs.get("additional_config") or {}),
                                       **runtime.as_additional_config()}
    with kvtc_plugin_switch(bool(calibration_path)):
        started = time.monotonic()
        llm = LLM(model, **kwargs)
        return llm, time.monotonic() - started


def capacity_tokens(llm: Any) -> int:
    return int(llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens)


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int, **sampling: Any):
    from lnarize_serve.vllm_compat.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **sampling)
    started = time.monotonic()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.monotonic() - started
    return [list(r.outputs[0].token_ids) for r in results], seconds, results


def top1_under(llm: Any, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[int]]:
    """The engine's top-1 token at each continuation position (teacher-forced)."""
    from lnarize_serve.vllm_compat.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    full = [{"prompt_token_ids": p + c} for p, c in zip(prompts, continuations)]
    results = llm.generate(full, params, use_tqdm=False)
    tops = []
    for prompt, cont, result in zip(prompts, continuations, results):
        logprobs = result.prompt_logprobs  # position i: distribution of token i given < i
        row = []
        for offset in range(len(cont)):
            dist = logprobs[len(prompt) + offset]
            row.append(max(dist.items(), key=lambda item: item[1].logprob)[0])
        tops.append(row)
    return tops


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
    same = total = prefix = 0
    for ref, cand in zip(reference, candidate):
        n = min(len(ref), len(cand))
        matches = [ref[i] == cand[i] for i in range(n)]
        same += sum(matches)
        total += n
        first_diff = matches.index(False) if False in matches else n
        prefix += first_diff
    return {"token_agreement": same / total, "mean_prefix_before_divergence": prefix / len(reference)}


def release(llm: Any) -> None:
    """Shut the engine's processes down before the next one starts."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def eval_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """Held-out Python source (never seen by calibration), exact token counts."""
    from lnarize_serve.kvtc_tools.corpus import token_sequences

    return [list(s) for s in token_sequences(tokenizer, "eval", length, count)]
