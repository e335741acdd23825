"""lnarize-serve: an OpenAI-compatible vLLM server for the Qwen3.6 LNARIZE model family."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lnarize-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
