"""What a router reads about the KV cache of a hybrid model with KVTC on is
what the engine really allocated: `vllm:cache_config_info`'s block_size is
the block size of the compressed full-attention cache in the worker (after
vLLM's hybrid alignment, which enlarges it so a page also fits the Gated
DeltaNet state), and num_gpu_blocks is the worker's block count, a count of
blocks that every layer group shares, not of attention tokens.

The tiny Qwen3-Next (random weights) on the CPU engine, prefix caching on
(vLLM's default for hybrid models), no MTP (CPU limitation with prefix caching,
see the shared CPU engine notes).
"""

from __future__ import annotations

import pytest

from lnarize_serve.kvtc_tools import engine_compare as ec
from tests.fixtures.tiny_qwen3_next import build_tiny_qwen3_next

ENGINE = dict(max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=4)


def allocated_cache(worker) -> dict:
    """Runs in the worker: the block sizes of its KV cache groups, by spec type, and the block count."""
    config = worker.model_runner.kv_cache_config
    sizes: dict[str, set[int]] = {}
    for group in config.kv_cache_groups:
        sizes.setdefault(type(group.kv_cache_spec).__name__, set()).add(group.kv_cache_spec.block_size)
    return {"block_sizes": {kind: sorted(values) for kind, values in sizes.items()}, "num_blocks": config.num_blocks}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tests.fixtures.kvtc_calibrations import tiny_hybrid_calibration

    model_dir = build_tiny_qwen3_next(tmp_path_factory.mktemp("tiny-qwen3-next"))
    with pytest.MonkeyPatch.context() as patch:
        # collective_rpc ships allocated_cache to the worker by pickle, which vLLM allows only on request
        patch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        llm, _ = ec.build_llm(str(model_dir), str(tiny_hybrid_calibration(model_dir)), **ENGINE)
        try:
            yield llm
        finally:
            ec.release(llm)


def cache_config_info(llm) -> dict[str, str]:
    (info,) = [metric for metric in llm.get_metrics() if metric.name == "vllm:cache_config_info"]
    return info.labels


def test_cache_config_info_is_the_allocated_hybrid_cache(engine):
    (allocated,) = engine.collective_rpc(allocated_cache)
    info = cache_config_info(engine)
    attention_sizes = [size for kind, sizes in allocated["block_sizes"].items() if "Mamba" not in kind
                       for size in sizes]
    assert attention_sizes, allocated
    assert {int(info["block_size"])} == set(attention_sizes), (info["block_size"], allocated)
    assert int(info["num_gpu_blocks"]) == allocated["num_blocks"]
    # The alignment enlarged it past vLLM's CPU default of 128 tokens (768 seen).
    assert int(info["block_size"]) > 128, allocated
    # Every layer group (full attention and DeltaNet alike) takes its pages from
    # these blocks, so block_size x num_gpu_blocks overstates the tokens the
    # cache holds several times; vLLM's group-aware token capacity (exported as
    # lnarize_kv_cache_capacity_tokens) is the figure for tokens.
    assert int(info["block_size"]) * int(info["num_gpu_blocks"]) > 2 * ec.capacity_tokens(engine)
