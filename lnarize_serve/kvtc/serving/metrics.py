"""KVTC series on the server's /metrics (registered in the app's registry)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from lnarize_serve.kvtc.serving.runtime_config import ADDITIONAL_CONFIG_KEY, KVTCRuntimeConfig


class KVTCMetrics:
    def __init__(self, registry: CollectorRegistry, enabled: bool) -> None:
        self.enabled = Gauge(
            "lnarize_kvtc_enabled", "1 when the KV cache is stored KVTC-compressed", registry=registry
        )
        self.bytes_per_token_per_head = Gauge(
            "lnarize_kvtc_bytes_per_token_per_kv_head",
            "KV cache bytes one token of one KV head occupies (K and V together)",
            registry=registry,
        )
        self.ratio_vs_bf16 = Gauge(
            "lnarize_kvtc_compression_ratio",
            "bf16 bytes per token per KV head divided by the cache's bytes",
            registry=registry,
        )
        self.exact_sink_tokens = Gauge(
            "lnarize_kvtc_exact_sink_tokens",
            "Leading tokens KVTC serves exactly (1: the position-0 sink), as resolved at start-up",
            registry=registry,
        )
        self.window_tokens = Gauge(
            "lnarize_kvtc_window_tokens",
            "Most recent tokens of each sequence KVTC keeps exact beside the compressed cache",
            registry=registry,
        )
        self.capacity_tokens = Gauge(
            "lnarize_kv_cache_capacity_tokens",
            "KV cache capacity in tokens, as vLLM computed it (its 'KV cache size')",
            registry=registry,
        )
        self.enabled.set(1 if enabled else 0)

    def record_engine(self, vllm_config: Any) -> None:
        """Read what the engine decided: capacity, and the slot size in use."""
        cache = vllm_config.cache_config
        if getattr(cache, "kv_cache_size_tokens", None):
            self.capacity_tokens.set(cache.kv_cache_size_tokens)
        head_dim = vllm_config.model_config.get_head_size()
        bf16 = 4 * head_dim
        additional = vllm_config.additional_config or {}
        if ADDITIONAL_CONFIG_KEY in additional:
            from lnarize_serve.kvtc.format.calibration import CalibrationSummary

            # the same parse the engine's processes run on the same config
            runtime = KVTCRuntimeConfig.from_additional_config(additional)
            slot = CalibrationSummary.read(runtime.calibration_path).slot_bytes
            self.exact_sink_tokens.set(runtime.sink_tokens)
            self.window_tokens.set(runtime.window_tokens)
        else:
            from lnarize_serve.vllm_compat.engine import get_dtype_size

            slot = 2 * head_dim * get_dtype_size(vllm_config.model_config.dtype)
            if cache.cache_dtype.startswith("fp8"):
                slot = 2 * head_dim
        self.bytes_per_token_per_head.set(slot)
        self.ratio_vs_bf16.set(bf16 / slot)
