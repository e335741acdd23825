"""What the checkpoint family and the GPU preset change in the engine launch.

Pure: settings + checkpoint facts + GPU facts -> a ``LaunchPlan``: the settings
with preset values adapted (an explicitly given LNARIZE_* value is never
changed; one that contradicts the checkpoint is refused), extra vLLM engine
arguments, environment variables for the engine, and the reason for each
choice (printed by ``lnarize-serve config``). ``LNARIZE_ENGINE_ARGS`` still
overrides every engine argument set here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lnarize_serve.family import INT4_AUTOROUND_GPTQ, CheckpointFacts, contradictions
from lnarize_serve.gpu import GpuFacts, profile_for
from lnarize_serve.settings import ConfigError, Settings, env_name

# More draft tokens than this crash the Gated DeltaNet attention metadata
# builder on qwen3_5 / qwen3_next hybrids (github.com/vllm-project/vllm/issues/37035, gdn_attn).
MAX_HYBRID_MTP_TOKENS = 4

# The Cascade NVFP4-MTP card (GB10 / DGX Spark) serves the text-only ModelOpt
# NVFP4 checkpoint with its MTP head, with these request defaults.
CASCADE_FAMILY = "text-nvfp4-mtp"
CASCADE_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}


@dataclass(frozen=True)
class Choice:
    what: str
    value: Any
    why: str


@dataclass(frozen=True)
class LaunchPlan:
    settings: Settings
    checkpoint: CheckpointFacts | None
    checkpoint_note: str
    gpu: GpuFacts | None
    gpu_profile: str
    gpu_profile_reason: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    choices: tuple[Choice, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.checkpoint.describe() if self.checkpoint else self.checkpoint_note,
            "gpu_profile": f"{self.gpu_profile}: {self.gpu_profile_reason}",
            "choices": [f"{c.what}={c.value}: {c.why}" for c in self.choices],
            "engine_environment": dict(self.environment),
        }

    def origin(self, name: str) -> str:
        """Where the effective value of setting ``name`` came from."""
        what = env_name(name)
        for choice in self.choices:
            if choice.what == what:
                family = f" x family {self.checkpoint.family}" if self.checkpoint else ""
                return f"gpu_profile {self.gpu_profile}{family}: {choice.why}"
        if name in self.settings.explicitly_set:
            return what
        if getattr(self.settings, name) == Settings.model_fields[name].get_default(call_default_factory=True):
            return "default"
        return f"profile {self.settings.profile}"


class _Builder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.updates: dict[str, Any] = {}
        self.engine_args: dict[str, Any] = {}
        self.environment: dict[str, str] = {}
        self.choices: list[Choice] = []

    def current(self, name: str) -> Any:
        return self.updates.get(name, getattr(self.settings, name))

    def setting(self, name: str, value: Any, why: str) -> None:
        """Adapt a setting unless it was given explicitly."""
        if name in self.settings.explicitly_set or self.current(name) == value:
            return
        self.updates[name] = value
        self.choices.append(Choice(env_name(name), value, why))

    def engine(self, name: str, value: Any, why: str) -> None:
        self.engine_args[name] = value
        self.choices.append(Choice(name, value, why))

    def env(self, name: str, value: str, why: str) -> None:
        self.environment[name] = value
        self.choices.append(Choice(name, value, why))


def _family_choices(b: _Builder, facts: CheckpointFacts) -> None:
    # The checkpoint decides the quantization: vLLM names the ModelOpt and
    # compressed-tensors formats explicitly; GPTQ-packed int4 is left to vLLM,
    # which then picks its Marlin kernel (an explicit "gptq" would not).
    b.setting("quantization", facts.vllm_quantization or "auto", f"the checkpoint's weights are {facts.quantization}")
    if not facts.has_mtp:
        b.setting("speculative_tokens", 0, "the checkpoint has no MTP head")
    if facts.quantization == INT4_AUTOROUND_GPTQ:
        # The int4 AutoRound + MTP model card: --dtype half and MTP n=1.
        b.setting("dtype", "float16", "int4 AutoRound card: --dtype half")
        if facts.has_mtp:
            b.setting("speculative_tokens", 1, "int4 AutoRound card: MTP n=1")


def _hybrid_choices(b: _Builder, hybrid: bool, on_gpu: bool) -> None:
    if not hybrid:
        return
    tokens = b.current("speculative_tokens")
    if tokens > MAX_HYBRID_MTP_TOKENS:
        raise ConfigError(
            f"LNARIZE_SPECULATIVE_TOKENS={tokens}: more than {MAX_HYBRID_MTP_TOKENS} MTP tokens crash vLLM's "
            f"Gated DeltaNet attention on this hybrid model (gdn_attn); use 1..{MAX_HYBRID_MTP_TOKENS}"
        )
    if b.current("enable_prefix_caching"):
        # Prefix caching + MTP on qwen3_5 / qwen3_next hybrids crashed (illegal
        # memory access, vllm-project/vllm#50021, #53726) and corrupted output (#53912)
        # outside the align mode; stated explicitly so a changed vLLM default
        # cannot move it.
        b.engine("mamba_cache_mode", "align", "hybrid + prefix caching: the mode MTP + prefix caching is safe in")
    if on_gpu and tokens > 0:
        # Start-up profiling does not count the spec-decode GDN workspace
        # (later OOM): let the allocator grow segments instead of fragmenting.
        b.env(
            "PYTORCH_CUDA_ALLOC_CONF",
            "expandable_segments:True",
            "hybrid + MTP: spec-decode GDN workspace is not counted by vLLM's memory profiling",
        )


def _gpu_choices(b: _Builder, profile: str, facts: CheckpointFacts | None) -> None:
    weights = facts.weight_format if facts else "nvfp4"  # the presets' model
    int4_mtp = facts is not None and facts.quantization == INT4_AUTOROUND_GPTQ and b.current("speculative_tokens") > 0
    eager = b.current("enforce_eager")
    if profile in ("sm120", "gb10") and not eager:
        if int4_mtp:
            # int4 AutoRound + MTP card: on some SM120/121 builds the capture
            # is invalidated on the MTP module; run without CUDA graphs.
            b.engine("compilation_config", {"cudagraph_mode": "NONE"}, "int4 AutoRound + MTP on SM12x: graph capture invalid")
        else:
            # FULL CUDA graphs with the XQA decode kernel silently corrupt
            # attention on SM120 (vllm-project/vllm#49010: needle 0/4, MTP acceptance
            # collapses); PIECEWISE keeps graphs for everything else. The GB10
            # card runs cudagraph_mode PIECEWISE too.
            b.engine("compilation_config", {"cudagraph_mode": "PIECEWISE"}, "SM12x: FULL graphs + XQA decode corrupt attention")
    if profile == "gb10":
        # Cascade NVFP4-MTP on GB10 / DGX Spark card, all four lines.
        if weights == "nvfp4":
            # The card's VLLM_NVFP4_GEMM_BACKEND=cutlass (the auto-selected GEMM
            # leaked ~394 MB per linear layer into the unified pool); vLLM 0.32
            # spells it as a kernel_config linear-backend override.
            b.engine(
                "kernel_config",
                {"linear_backend_per_quant": {"nvfp4_w4a4": "cutlass"}},
                "GB10 card: the auto NVFP4 GEMM leaks ~394 MB per linear layer",
            )
        b.engine("attention_backend", "TRITON_ATTN", "GB10 card: --attention-backend TRITON_ATTN")
        b.engine("max_num_batched_tokens", 8192, "GB10 card: --max-num-batched-tokens 8192")
        b.setting("gpu_mem_util", 0.7, "GB10 card: unified memory shared with the OS, --gpu-memory-utilization 0.7")
    if profile == "hopper" and weights == "nvfp4":
        # SM90 has no FP4 tensor cores: NVFP4 runs as W4A16 through vLLM's
        # Marlin kernel; stated so no other backend is tried.
        b.engine(
            "kernel_config",
            {"linear_backend_per_quant": {"nvfp4_w4a4": "marlin"}},
            "Hopper: NVFP4 weights through Marlin (no FP4 tensor cores on SM90)",
        )


def _request_default_choices(b: _Builder, profile: str, facts: CheckpointFacts | None) -> None:
    if profile != "gb10" or facts is None or facts.family != CASCADE_FAMILY:
        return
    b.setting("sampling_defaults", dict(CASCADE_SAMPLING), "Cascade NVFP4-MTP GB10 card: never greedy (temperature 0 loops)")
    b.setting(
        "thinking_default", False, "Cascade NVFP4-MTP GB10 card: thinking off unless a request's chat_template_kwargs ask"
    )


def resolve_gpu_profile(settings: Settings, gpu: GpuFacts | None) -> tuple[str, str]:
    if settings.gpu_profile != "auto":
        return settings.gpu_profile, f"forced by LNARIZE_GPU_PROFILE={settings.gpu_profile}"
    return profile_for(gpu)


def plan_launch(
    settings: Settings,
    checkpoint: CheckpointFacts | None,
    gpu: GpuFacts | None,
    checkpoint_note: str = "",
) -> LaunchPlan:
    """The launch for these settings on this checkpoint and GPU (pure).

    ``checkpoint`` None means its config was not at hand: the preset's
    assumptions (a hybrid Qwen3.6 with an MTP head) stand.
    Raises ConfigError for explicit settings the checkpoint contradicts.
    """
    if checkpoint is not None:
        problems = contradictions(settings, checkpoint)
        if problems:
            raise ConfigError("\n".join(problems))
    builder = _Builder(settings)
    if checkpoint is not None:
        _family_choices(builder, checkpoint)
    profile, reason = resolve_gpu_profile(settings, gpu)
    hybrid = checkpoint.hybrid if checkpoint is not None else True
    _hybrid_choices(builder, hybrid, on_gpu=profile != "none" or gpu is not None)
    _gpu_choices(builder, profile, checkpoint)
    _request_default_choices(builder, profile, checkpoint)
    adapted = settings.model_copy(update=builder.updates) if builder.updates else settings
    note = checkpoint_note or (checkpoint.source if checkpoint else "")
    return LaunchPlan(
        settings=adapted,
        checkpoint=checkpoint,
        checkpoint_note=note,
        gpu=gpu,
        gpu_profile=profile,
        gpu_profile_reason=reason,
        engine_args=builder.engine_args,
        environment=builder.environment,
        choices=tuple(builder.choices),
    )
