"""Run the KVTC Triton kernels on this machine: compiled on a GPU when there
is one, otherwise through Triton's CPU interpreter (tests/fixtures/triton_kernels.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.triton_kernels import kernel_device as _kernel_device
from tests.fixtures.triton_kernels import kernel_modules


@pytest.fixture(scope="session")
def kernel_device() -> str:
    return _kernel_device()


@pytest.fixture(scope="module")
def kernels(kernel_device):
    pytest.importorskip("triton", reason="the KVTC kernels are Triton kernels")
    with kernel_modules(kernel_device, "lnarize_serve.kvtc.kernels") as (module,):
        yield module
