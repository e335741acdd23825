"""The platform vLLM runs on (CUDA, CPU, ...); lighter to import than the engine."""

from vllm.platforms import current_platform

__all__ = ["current_platform"]
