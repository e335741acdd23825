"""vLLM's async engine. Importing it runs torch operators: import it only where
the engine is built or used, never in the server process before it forks the
engine core (tests/unit/kvtc/test_server_process_setup.py)."""

from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["AsyncLLM"]
