"""The GPU at hand (through NVML) and the hardware preset it selects.

NVML, not torch.cuda: querying through torch would create a CUDA context in
the API process, and vLLM then has to spawn its engine instead of forking it.
NVML comes with vLLM's CUDA build (nvidia-ml-py); without it, or without a GPU,
the probe answers None.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GPU_PROFILES = ("sm120", "b200", "gb10", "hopper", "none")


@dataclass(frozen=True)
class GpuFacts:
    name: str
    capability: tuple[int, int]
    total_memory_bytes: int
    # The CUDA version the driver supports (e.g. (12, 8)); None when unknown.
    driver_cuda: tuple[int, int] | None = None
    # GB10 / DGX Spark: GPU and CPU share one memory pool (NVML reports no
    # framebuffer size; the total is the system memory).
    unified_memory: bool = False

    @property
    def sm(self) -> int:
        return self.capability[0] * 10 + self.capability[1]

    def describe(self) -> str:
        memory = f"{self.total_memory_bytes / 2**30:.1f} GiB{' unified' if self.unified_memory else ''}"
        driver = f", driver CUDA {self.driver_cuda[0]}.{self.driver_cuda[1]}" if self.driver_cuda else ""
        return f"{self.name} (SM {self.capability[0]}.{self.capability[1]}, {memory}{driver})"


def _visible_index() -> int | None:
    """The first GPU vLLM will use, by NVML index; None when CUDA_VISIBLE_DEVICES hides them all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return 0
    first = visible.split(",")[0].strip()
    if first in ("", "-1"):
        return None
    return int(first) if first.isdigit() else 0


def probe_gpu() -> GpuFacts | None:
    """The first visible GPU's facts through NVML; None without NVML or GPU."""
    index = _visible_index()
    if index is None:
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if pynvml.nvmlDeviceGetCount() <= index:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        capability = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(handle))
        unified = False
        try:
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        except pynvml.NVMLError:
            # GB10's NVML has no framebuffer size: the pool is system memory.
            import psutil

            total, unified = int(psutil.virtual_memory().total), True
        try:
            version = int(pynvml.nvmlSystemGetCudaDriverVersion())
            driver = (version // 1000, (version % 1000) // 10)
        except pynvml.NVMLError:
            driver = None
        return GpuFacts(name, (capability[0], capability[1]), total, driver, unified)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def profile_for(gpu: GpuFacts | None) -> tuple[str, str]:
    """(hardware preset, why) for the GPU at hand."""
    if gpu is None:
        return "none", "no GPU found (NVML)"
    where = gpu.describe()
    if gpu.capability == (12, 1) or "GB10" in gpu.name.upper():
        return "gb10", f"{where}: SM 12.1 unified-memory GB10 / DGX Spark"
    if gpu.capability[0] == 12:
        return "sm120", f"{where}: SM 12.x Blackwell workstation (RTX PRO 6000 / 5090)"
    if gpu.capability[0] == 10:
        return "b200", f"{where}: SM 10.x Blackwell datacenter (B200)"
    if gpu.capability == (9, 0):
        return "hopper", f"{where}: SM 9.0 Hopper (H100 / H200)"
    return "none", f"{where}: no preset for this architecture; vLLM's defaults"
