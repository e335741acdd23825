"""Guards shared by the kernel wrappers."""

from __future__ import annotations

import torch


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Refuse, with the fix, a launch that cannot run where the tensors are.

    Triton decides at import whether kernels are compiled for a GPU or run by
    its CPU interpreter (TRITON_INTERPRET=1), so CPU tensors need the latter.
    """
    on_cpu = any(t.device.type == "cpu" for t in tensors)
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if on_cpu and not interpreted:
        raise RuntimeError(
            "KVTC Triton kernels got CPU tensors but were compiled for a GPU: set "
            "TRITON_INTERPRET=1 before lnarize_serve.kvtc.kernels is first imported, "
            "or use the torch reference ops on CPU")
