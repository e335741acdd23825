"""vLLM's engine as the server process sees it before the engine exists: its
arguments, sampling, its errors and stats. Importing this runs no torch
operator (the engine itself, which does, is in ``async_engine``)."""

from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.metrics.prometheus import get_prometheus_registry

__all__ = [
    "AsyncEngineArgs",
    "EngineDeadError",
    "EngineGenerateError",
    "SamplingParams",
    "UsageContext",
    "VllmConfig",
    "get_dtype_size",
    "get_prometheus_registry",
]
