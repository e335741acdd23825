"""Run the KVTC Triton kernels on this machine: compiled on a GPU when there
is one, otherwise through Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton fixes "compiled or interpreted" when a @triton.jit function is
defined, its own standard library included (at ``import triton``). Another
test module may already have imported triton (vLLM does), so on a CPU this
imports a fresh, interpreted triton and kernel modules. The variable stays set
while a kernel test module runs (triton imports parts of itself lazily) and is
put back afterwards, so engine subprocesses of other tests never see it.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

_KERNELS = "lnarize_serve.kvtc.kernels"


def _interpreted(module: ModuleType) -> bool:
    return type(module.language.standard.zeros).__name__ == "InterpretedFunction"


def _import_interpreted_kernels() -> ModuleType:
    triton = sys.modules.get("triton")
    if triton is not None and not _interpreted(triton):
        # the compiled extension (triton._C) cannot be loaded twice: keep it
        for name in list(sys.modules):
            python_part = name.split(".")[0] == "triton" and not name.startswith("triton._C")
            if python_part or name.startswith(_KERNELS):
                del sys.modules[name]
    triton = importlib.import_module("triton")
    importlib.import_module("triton.language")
    assert _interpreted(triton), "triton did not switch to its interpreter"
    return importlib.import_module(_KERNELS)


@pytest.fixture(scope="session")
def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels(kernel_device):
    pytest.importorskip("triton", reason="the KVTC kernels are Triton kernels")
    if kernel_device == "cuda":
        yield importlib.import_module(_KERNELS)
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield _import_interpreted_kernels()
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
