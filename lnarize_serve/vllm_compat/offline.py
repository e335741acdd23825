"""vLLM's offline engine (``LLM``), which the KVTC tools run side by side with
and without the compressed cache (kvtc_tools/engine_compare.py)."""

from vllm import LLM

__all__ = ["LLM"]
