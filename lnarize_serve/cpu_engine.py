"""What vLLM's CPU engine runs on: the model dtype and the x86 instruction set.

Correctness on vLLM-CPU depends on both (its bf16 path answered wrongly on
AVX-512/AMX machines where float32 was right), so start-up logs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lnarize_serve.vllm_compat.engine import VllmConfig


def isa_name(*, amx: bool, avx512_bf16: bool, avx512: bool, avx2: bool) -> str:
    """The most capable instruction set vLLM-CPU's kernels pick from, by name."""
    if amx:
        return "amx"
    if avx512_bf16:
        return "avx512_bf16"
    if avx512:
        return "avx512"
    if avx2:
        return "avx2"
    return "none of avx2/avx512/amx"


def detected_isa() -> str:
    # The same torch probes vLLM's CPU platform uses to choose its kernels.
    import torch

    return isa_name(
        amx=torch.cpu._is_amx_tile_supported(),
        avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
        avx512=torch.cpu._is_avx512_supported(),
        avx2=torch.cpu._is_avx2_supported(),
    )


def cpu_engine_description(vllm_config: VllmConfig) -> str | None:
    """One start-up log line for a CPU engine; None on any other platform."""
    from lnarize_serve.vllm_compat.platform import current_platform

    if not current_platform.is_cpu():
        return None
    dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
    return f"CPU engine: dtype {dtype}, CPU ISA {detected_isa()}"
