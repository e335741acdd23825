"""Prometheus metrics: ``lnarize_*`` series in a per-app registry, served with vLLM's ``vllm:*`` series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from lnarize_serve.kvtc.serving.metrics import KVTCMetrics
from lnarize_serve.lifecycle import Phase
from lnarize_serve.settings import Settings
from lnarize_serve.vllm_compat import installed_vllm_version

# Settings shown in lnarize_settings_info (never the API key).
_INFO_SETTINGS = (
    "profile",
    "model",
    "served_model_name",
    "max_model_len",
    "max_num_seqs",
    "gpu_mem_util",
    "quantization",
    "kv_cache_dtype",
    "speculative_tokens",
    "enforce_eager",
    "enable_prefix_caching",
    "kvtc_enable",
)


class ServerMetrics:
    """The server's own series. One registry per app, so apps never collide."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Info("lnarize_build", "lnarize-serve build information", registry=self.registry)
        self.settings_info = Info("lnarize_settings", "Effective non-secret settings", registry=self.registry)
        self.ready = Gauge("lnarize_ready", "1 when the server accepts inference requests", registry=self.registry)
        self.phase = Gauge("lnarize_phase", "Current life phase (1 for the active one)", ["phase"], registry=self.registry)
        self.requests = Counter(
            "lnarize_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "lnarize_request_duration_seconds",
            "HTTP request duration until the last byte of the response",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge("lnarize_in_flight_requests", "Admitted /v1 requests not finished yet", registry=self.registry)
        self.engine_load_seconds = Gauge(
            "lnarize_engine_load_seconds", "Seconds to build the vLLM engine (0 until loaded)", registry=self.registry
        )
        self.warmup_seconds = Gauge(
            "lnarize_warmup_seconds", "Seconds the warm-up generation (prefill and a few decode steps) took", registry=self.registry
        )
        self.kvtc = KVTCMetrics(self.registry, settings.kvtc_enable)
        # The paths the app serves (create_app sets them once its routes exist)
        # get their own label value; any other is "other" (bounded cardinality).
        self.routes: frozenset[str] = frozenset()
        self.build_info.info({"version": version, "vllm_version": installed_vllm_version() or "unknown"})
        self.settings_info.info({name: str(getattr(settings, name)) for name in _INFO_SETTINGS})
        self.set_phase(Phase.LOADING)

    def set_phase(self, phase: Phase) -> None:
        for candidate in Phase:
            self.phase.labels(phase=candidate.value).set(1 if candidate is phase else 0)
        self.ready.set(1 if phase is Phase.READY else 0)

    def route_label(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = self.route_label(path)
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def exposition(self) -> bytes:
        # vLLM registers its vllm:* series in its own (usually the default) registry.
        from lnarize_serve.vllm_compat.engine import get_prometheus_registry

        return generate_latest(self.registry) + generate_latest(get_prometheus_registry())


async def metrics_endpoint(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
