"""Settings -> vLLM ``AsyncEngineArgs``: a pure function, no I/O.

The model location is passed in separately because resolving it can do I/O
(the cpu-demo model is converted on first use); ``lnarize-serve config``
passes the location it *would* use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lnarize_serve.settings import SPECULATIVE_METHOD, Settings

if TYPE_CHECKING:
    from lnarize_serve.launch import LaunchPlan
    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs


def speculative_config(settings: Settings) -> dict[str, Any] | None:
    if not settings.speculative_enabled:
        return None
    return {"method": SPECULATIVE_METHOD, "num_speculative_tokens": settings.speculative_tokens}


def engine_arg_values(
    settings: Settings, model_location: str | None = None, launch: LaunchPlan | None = None
) -> dict[str, Any]:
    """The keyword arguments for AsyncEngineArgs, as plain data (printable by `config`).

    ``launch`` (family + GPU preset, launch.py) replaces the settings with its
    adapted ones and adds its engine arguments; the KVTC backend and
    LNARIZE_ENGINE_ARGS still override them.
    """
    if launch is not None:
        settings = launch.settings
    values: dict[str, Any] = {
        "model": model_location or settings.model,
        "revision": settings.revision,
        "served_model_name": [settings.effective_served_model_name],
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_mem_util,
        # "auto" means: let vLLM read the method from the checkpoint's config.
        "quantization": None if settings.quantization == "auto" else settings.quantization,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "dtype": settings.dtype,
        "speculative_config": speculative_config(settings),
        # enforce_eager=False is what turns CUDA graphs (and torch.compile) on.
        "enforce_eager": settings.enforce_eager,
        "language_model_only": settings.language_model_only,
        # vLLM spells "no reasoning parser" as the empty string.
        "reasoning_parser": settings.reasoning_parser or "",
        "enable_prefix_caching": settings.enable_prefix_caching,
        "download_dir": str(settings.cache_dir / "hub") if settings.cache_dir else None,
        # Prometheus stats feed /metrics; per-request logging stays off (privacy).
        "disable_log_stats": False,
        "enable_log_requests": False,
    }
    if settings.sampling_defaults:
        # vLLM merges it over generation_config.json into its default sampling
        # parameters; a request's own values still win.
        values["override_generation_config"] = dict(settings.sampling_defaults)
    if launch is not None:
        values.update(launch.engine_args)
    from lnarize_serve.kvtc.serving.serving_setup import kvtc_engine_arg_values

    values.update(kvtc_engine_arg_values(settings))
    values.update(settings.engine_args)
    return values


def build_engine_args(
    settings: Settings, model_location: str | None = None, launch: LaunchPlan | None = None
) -> AsyncEngineArgs:
    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs

    return AsyncEngineArgs(**engine_arg_values(settings, model_location, launch))
