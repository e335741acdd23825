"""Start-up checks before any weight download or engine build (well under a second).

- a GPU is present (unless the engine is vLLM's CPU build or the cpu-demo profile);
- its compute capability runs the checkpoint's weights and activations;
- the driver's CUDA is not older than the image's CUDA major version;
- the memory plan: ``max_num_seqs x max_model_len`` tokens of KV fit beside
  the weights (plan.py's arithmetic, fed by the checkpoint's geometry); if
  not, one line with the numbers and the settings that would fit.

``LNARIZE_PREFLIGHT=warn`` turns the refusals into warnings.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lnarize_serve.plan import (
    GIB,
    QWEN36_27B,
    ModelGeometry,
    PlanRequest,
    default_kvtc_slot_bytes,
    geometry_from_hf_config,
    kv_memory_from_gpu,
    mode_capacity,
)

if TYPE_CHECKING:
    from lnarize_serve.gpu import GpuFacts
    from lnarize_serve.launch import LaunchPlan
    from lnarize_serve.settings import Settings

# Activation peak, CUDA graphs, sampler and the MTP head besides weights and
# KV: `lnarize-serve plan`'s default, which matched vLLM's capacity on an H200.
OVERHEAD_BYTES = 4 * GIB
# vLLM's GPU block size; the hybrid page alignment is derived from it.
GPU_BLOCK_SIZE = 16

# The oldest compute capability (major*10+minor) this server runs each weight
# format on. NVFP4: vLLM's Marlin W4A16 path on Ampere and Hopper, native FP4
# tensor cores on SM100 / SM120 (vLLM 0.32's ModelOptNvFp4Config accepts SM75
# too, but the family's bfloat16 activations need SM80). FP8 (vLLM's
# ModelOptFp8Config minimum): SM80. GPTQ-packed int4 (AutoRound loads as
# vLLM's "inc"): SM60, vLLM's INCConfig minimum (Marlin from SM80).
WEIGHT_MIN_SM = {"nvfp4": 80, "fp8": 80, "int4": 60}
WEIGHT_NAMES = {"nvfp4": "NVFP4", "fp8": "FP8", "int4": "int4 (GPTQ/AutoRound)"}
# bfloat16 activations need Ampere (SM80) or newer; float16 runs from SM70.
BF16_MIN_SM = 80


def _sm_text(sm: int) -> str:
    return f"{sm // 10}.{sm % 10}"


def _weights_format(launch: LaunchPlan) -> str:
    if launch.checkpoint is not None:
        return launch.checkpoint.weight_format
    # Preset assumptions: what the configured quantization loads.
    return {"modelopt_fp4": "nvfp4", "modelopt": "fp8", "gptq_marlin": "int4", "inc": "int4"}.get(
        launch.settings.quantization, "bf16"
    )


def _activation_dtype(settings: Settings, launch: LaunchPlan) -> str:
    if settings.dtype in ("float16", "half"):
        return "float16"
    if settings.dtype in ("float32", "float"):
        return "float32"
    if settings.dtype == "bfloat16":
        return "bfloat16"
    config = launch.checkpoint.config if launch.checkpoint else {}
    text = config.get("text_config") or config
    return str(text.get("dtype") or text.get("torch_dtype") or "bfloat16")


def architecture_problems(launch: LaunchPlan, gpu: GpuFacts) -> list[str]:
    settings = launch.settings
    weights = _weights_format(launch)
    needed = WEIGHT_MIN_SM.get(weights, 0)
    if gpu.sm < needed:
        return [
            f"{gpu.describe()} cannot run {WEIGHT_NAMES[weights]} weights: they need SM >= {_sm_text(needed)} "
            "(vLLM's minimum for them; native NVFP4 on SM 10.0 / 12.0): use a newer GPU"
        ]
    if _activation_dtype(settings, launch) == "bfloat16" and gpu.sm < BF16_MIN_SM:
        return [
            f"{gpu.describe()} has no bfloat16 (needs SM >= {_sm_text(BF16_MIN_SM)}), the checkpoint's dtype: "
            "set LNARIZE_DTYPE=float16"
        ]
    return []


def driver_problems(gpu: GpuFacts, runtime_cuda: tuple[int, int] | None) -> list[str]:
    if gpu.driver_cuda is None or runtime_cuda is None or gpu.driver_cuda[0] >= runtime_cuda[0]:
        return []
    return [
        f"the NVIDIA driver supports CUDA {gpu.driver_cuda[0]}.{gpu.driver_cuda[1]}, older than this image's "
        f"CUDA {runtime_cuda[0]}.{runtime_cuda[1]}: update the driver"
    ]


def _kv_mode(settings: Settings) -> str | None:
    if settings.kvtc_enable:
        return "kvtc"
    dtype = settings.kv_cache_dtype
    if dtype in ("auto", "bfloat16", "float16"):
        return "bf16"
    if dtype.startswith("fp8"):
        return "fp8"
    return dtype if dtype in ("nvfp4", "int4_per_token_head") else None


def memory_problems(
    launch: LaunchPlan, gpu: GpuFacts, geometry: ModelGeometry, weights_bytes: int
) -> list[str]:
    settings = launch.settings
    mode = _kv_mode(settings)
    if mode is None:
        return []
    util = settings.gpu_mem_util
    kv_bytes = kv_memory_from_gpu(gpu.total_memory_bytes, util, weights_bytes, OVERHEAD_BYTES)
    usable = gpu.total_memory_bytes * util / GIB
    if kv_bytes <= 0:
        need = (weights_bytes + OVERHEAD_BYTES) / GIB
        return [
            f"{gpu.describe()} is too small: {usable:.1f} GiB at LNARIZE_GPU_MEM_UTIL={util} cannot hold "
            f"{weights_bytes / GIB:.1f} GiB of weights + {OVERHEAD_BYTES / GIB:.0f} GiB overhead, let alone a KV cache "
            f"(needs more than {need / util:.0f} GiB of GPU memory)"
        ]
    slot = default_kvtc_slot_bytes(geometry.head_dim)
    tokens = settings.speculative_tokens

    def capacity(kv_mode: str, seqs: int, length: int):
        request = PlanRequest(
            kv_memory_bytes=kv_bytes,
            max_model_len=length,
            max_num_seqs=seqs,
            block_size=GPU_BLOCK_SIZE,
            kernel_block_alignment=GPU_BLOCK_SIZE,
            num_speculative_tokens=tokens,
            prefix_caching=settings.enable_prefix_caching,
        )
        return mode_capacity(geometry, request, kv_mode, slot)

    seqs, length = settings.max_num_seqs, settings.max_model_len
    current = capacity(mode, seqs, length)
    if current.fits:
        return []
    fixes = []
    if mode == "bf16":
        fp8 = capacity("fp8", seqs, length)
        if fp8.fits:
            fixes.append(f"LNARIZE_KV_CACHE_DTYPE=fp8 ({fp8.capacity_tokens:,} tokens)")
        kvtc = capacity("kvtc", seqs, length)
        if kvtc.fits:
            fixes.append(f"LNARIZE_KVTC_ENABLE=true ({kvtc.capacity_tokens:,} tokens)")
    if current.max_concurrency >= 1:
        fixes.append(f"LNARIZE_MAX_NUM_SEQS={math.floor(current.max_concurrency)}")
    def longest_context(num_seqs: int) -> int:
        """The longest context (a multiple of 1024) that fits ``num_seqs`` sequences; 0: none."""
        low, high = 0, length // 1024
        while low < high:
            middle = (low + high + 1) // 2
            if capacity(mode, num_seqs, middle * 1024).fits:
                low = middle
            else:
                high = middle - 1
        return low * 1024

    shorter = longest_context(seqs)
    if shorter:
        fixes.append(f"LNARIZE_MAX_MODEL_LEN={shorter}")
    if not fixes and seqs > 1 and (single := longest_context(1)):
        fixes.append(f"LNARIZE_MAX_NUM_SEQS=1 with LNARIZE_MAX_MODEL_LEN={single}")
    shown_mode = {"bf16": f"{settings.kv_cache_dtype} ({mode})", "kvtc": "KVTC"}.get(mode, mode)
    return [
        f"memory plan: {seqs} x {length:,} tokens = {seqs * length:,} tokens of KV do not fit on {gpu.describe()}: "
        f"{usable:.1f} GiB at LNARIZE_GPU_MEM_UTIL={util} - {weights_bytes / GIB:.1f} GiB weights - "
        f"{OVERHEAD_BYTES / GIB:.0f} GiB overhead = {kv_bytes / GIB:.1f} GiB of {shown_mode} KV cache holds "
        f"{current.capacity_tokens:,} tokens ({current.max_concurrency:.2f} sequences of {length:,}); "
        + (f"would fit: {' or '.join(fixes)}" if fixes else "nothing at this context fits: use a larger GPU")
    ]


def preflight_problems(
    launch: LaunchPlan,
    gpu_expected: bool,
    geometry: ModelGeometry | None,
    weights_bytes: int | None,
    runtime_cuda: tuple[int, int] | None = None,
) -> list[str]:
    """Pure: every problem as one line (empty: the start can work)."""
    if not gpu_expected:
        return []
    gpu = launch.gpu
    if gpu is None:
        return [
            "no NVIDIA GPU found (NVML sees none, or CUDA_VISIBLE_DEVICES hides them): this profile needs one; "
            "LNARIZE_PROFILE=cpu-demo runs without"
        ]
    # The first kind of problem found: a GPU that cannot run the weights
    # makes its memory plan moot.
    problems = architecture_problems(launch, gpu) or driver_problems(gpu, runtime_cuda)
    if not problems and geometry is not None and weights_bytes is not None:
        problems = memory_problems(launch, gpu, geometry, weights_bytes)
    return problems


# --------------------------------------------------------------------------
# The facts preflight needs, gathered (I/O)
# --------------------------------------------------------------------------


def gpu_expected(settings: Settings) -> bool:
    """False for the cpu-demo profile and for vLLM's CPU build."""
    if settings.profile == "cpu-demo":
        return False
    from lnarize_serve.vllm_compat.platform import current_platform

    return not current_platform.is_cpu()


def runtime_cuda_version() -> tuple[int, int] | None:
    import torch

    version = getattr(torch.version, "cuda", None)
    if not version:
        return None
    major, _, minor = version.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def model_geometry(launch: LaunchPlan) -> ModelGeometry | None:
    if launch.checkpoint is not None:
        try:
            return geometry_from_hf_config(launch.checkpoint.config, name=launch.settings.model)
        except (KeyError, TypeError, ValueError):
            return None
    from lnarize_serve.settings import DEFAULT_MODEL

    return QWEN36_27B if launch.settings.model == DEFAULT_MODEL else None


def weights_bytes(launch: LaunchPlan, location: str, online: bool) -> int | None:
    """The checkpoint's safetensors total (index or files); the built-in
    estimate for the default model when its index is not at hand."""
    import json
    from pathlib import Path

    from lnarize_serve.family import CheckpointError, _hub_file
    from lnarize_serve.plan import _weights_bytes_in

    settings = launch.settings
    folder = Path(location).expanduser()
    if folder.is_dir():
        return _weights_bytes_in(folder)
    cache = settings.cache_dir / "hub" if settings.cache_dir else None
    try:
        index = _hub_file(location, "model.safetensors.index.json", settings.revision, cache, online)
    except CheckpointError:
        index = None
    if index is not None:
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    geometry = model_geometry(launch)
    return geometry.weights_bytes if geometry is QWEN36_27B else None


def run_preflight(launch: LaunchPlan, location: str, online: bool) -> list[str]:
    settings = launch.settings
    if not gpu_expected(settings):
        return []
    geometry = model_geometry(launch)
    return preflight_problems(
        launch, True, geometry, weights_bytes(launch, location, online), runtime_cuda_version()
    )
