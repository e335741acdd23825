"""Which member of the model family a checkpoint is, read from its config files
before the engine is built.

From ``config.json`` (+ ``hf_quant_config.json``, which ModelOpt writes beside
it) this decides the weight quantization, whether an MTP head exists and how
deep it is, text-only vs vision-language, and hybrid (Gated DeltaNet linear
attention) or not. The files come from a local folder or the Hugging Face
cache; the Hub is asked only when the caller allows it, so ``lnarize-serve
config`` stays offline-safe.

Settings given explicitly that contradict the checkpoint are refused naming
both; preset values the checkpoint contradicts are adapted (see launch.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Quantization families this server knows, with the vLLM method names that
# load each (an explicit LNARIZE_QUANTIZATION must be one of them).
MODELOPT_NVFP4 = "modelopt_nvfp4"
MODELOPT_FP8 = "modelopt_fp8"
INT4_AUTOROUND_GPTQ = "int4_autoround_gptq"
COMPRESSED_TENSORS = "compressed_tensors"
UNQUANTIZED = "none"

COMPATIBLE_VLLM_METHODS: dict[str, tuple[str, ...]] = {
    MODELOPT_NVFP4: ("modelopt_fp4",),
    MODELOPT_FP8: ("modelopt",),
    # vLLM's Marlin path loads AutoRound's GPTQ-packed int4 ("inc" reads the
    # AutoRound config itself); plain "gptq" works but forgoes Marlin.
    INT4_AUTOROUND_GPTQ: ("inc", "gptq_marlin", "gptq", "auto_gptq"),
    COMPRESSED_TENSORS: ("compressed-tensors",),
}
# Methods that only read weights already quantized in the checkpoint: naming
# one for an unquantized checkpoint is a contradiction (online methods such as
# "fp8", which quantize bf16 weights at load, are not).
CHECKPOINT_FORMAT_METHODS = frozenset(
    {m for methods in COMPATIBLE_VLLM_METHODS.values() for m in methods}
    | {"awq", "auto_awq", "awq_marlin", "modelopt_mxfp8", "modelopt_mixed", "quark", "fp_quant", "mxfp4"}
)


class CheckpointError(ValueError):
    """The checkpoint's config files cannot be read or say something unsupported."""


class CheckpointUnavailable(CheckpointError):
    """The config is neither local nor cached, and the Hub could not be asked."""


@dataclass(frozen=True)
class CheckpointFacts:
    quantization: str  # one of the constants above
    weight_format: str  # "nvfp4", "fp8", "int4" or "bf16": what the GPU must run
    mtp_layers: int
    vision: bool
    hybrid: bool
    model_type: str
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_mtp(self) -> bool:
        return self.mtp_layers > 0

    @property
    def vllm_quantization(self) -> str | None:
        """The method to pass vLLM explicitly; None lets vLLM pick its best
        kernel from the checkpoint (for GPTQ-style int4 an explicit "gptq"
        would switch Marlin off)."""
        if self.quantization in (MODELOPT_NVFP4, MODELOPT_FP8, COMPRESSED_TENSORS):
            return COMPATIBLE_VLLM_METHODS[self.quantization][0]
        return None

    @property
    def family(self) -> str:
        """Short name: text|vlm - quantization [- mtp], e.g. ``vlm-nvfp4-mtp``."""
        quant = {
            MODELOPT_NVFP4: "nvfp4",
            MODELOPT_FP8: "fp8",
            INT4_AUTOROUND_GPTQ: "int4",
            COMPRESSED_TENSORS: f"ct-{self.weight_format}",
            UNQUANTIZED: "bf16",
        }[self.quantization]
        return "-".join(p for p in ("vlm" if self.vision else "text", quant, "mtp" if self.has_mtp else "") if p)

    def describe(self) -> str:
        return (
            f"{self.family} ({self.model_type or 'unknown model_type'}; quantization {self.quantization}, "
            f"MTP layers {self.mtp_layers}, {'hybrid' if self.hybrid else 'not hybrid'}"
            f"{', ' + self.source if self.source else ''})"
        )


def _modelopt_algo(quantization_config: dict[str, Any] | None, hf_quant_config: dict[str, Any] | None) -> str | None:
    for candidate in (quantization_config or {}, (hf_quant_config or {}).get("quantization") or {}):
        algo = candidate.get("quant_algo") or (candidate.get("quantization") or {}).get("quant_algo")
        if algo:
            return str(algo).upper()
    return None


def _compressed_tensors_format(quantization_config: dict[str, Any]) -> str:
    fmt = str(quantization_config.get("format") or "")
    groups = quantization_config.get("config_groups") or {}
    formats = {fmt} | {str(g.get("format") or "") for g in groups.values() if isinstance(g, dict)}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if any("nvfp4" in f for f in formats):
        return "nvfp4"
    if any(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights) or "float-quantized" in formats:
        return "fp8"
    if any(w.get("type") == "int" and w.get("num_bits") == 4 for w in weights) or "pack-quantized" in formats:
        return "int4"
    return "other"


def detect_quantization(config: dict[str, Any], hf_quant_config: dict[str, Any] | None = None) -> tuple[str, str]:
    """(quantization family, weight format) from config.json and hf_quant_config.json."""
    text = config.get("text_config") or {}
    qc = config.get("quantization_config") or text.get("quantization_config")
    producer = str(((hf_quant_config or {}).get("producer") or {}).get("name") or "").lower()
    method = str((qc or {}).get("quant_method") or ("modelopt" if producer == "modelopt" else "")).lower()
    if not method:
        return UNQUANTIZED, "bf16"
    if method == "modelopt":
        algo = _modelopt_algo(qc, hf_quant_config)
        if algo == "NVFP4":
            return MODELOPT_NVFP4, "nvfp4"
        if algo == "FP8":
            return MODELOPT_FP8, "fp8"
        raise CheckpointError(f"ModelOpt quant_algo {algo!r} is not one this server serves (NVFP4, FP8)")
    if method in ("auto-round", "auto_round", "intel/auto-round", "gptq"):
        bits = int((qc or {}).get("bits") or 4)
        if bits != 4:
            raise CheckpointError(f"{method} with {bits} bits is not one this server serves (int4)")
        return INT4_AUTOROUND_GPTQ, "int4"
    if method == "compressed-tensors":
        return COMPRESSED_TENSORS, _compressed_tensors_format(qc or {})
    raise CheckpointError(f"quant_method {method!r} is not one this server serves (modelopt, auto-round, gptq, compressed-tensors)")


def mtp_layer_count(config: dict[str, Any]) -> int:
    """MTP depth. Qwen3.5/3.6 say ``mtp_num_hidden_layers`` (in text_config):
    a reader of only ``num_nextn_predict_layers`` (the Qwen3-Next / DeepSeek
    name) finds zero draft layers on these checkpoints."""
    for section in (config.get("text_config") or {}, config):
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            if section.get(key):
                return int(section[key])
    return 0


def is_hybrid(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or config
    layer_types = text.get("layer_types") or []
    return "linear_attention" in layer_types or bool(text.get("full_attention_interval"))


def detect_checkpoint(
    config: dict[str, Any], hf_quant_config: dict[str, Any] | None = None, source: str = ""
) -> CheckpointFacts:
    """Pure: the facts the two config files state."""
    quantization, weight_format = detect_quantization(config, hf_quant_config)
    text = config.get("text_config") or {}
    return CheckpointFacts(
        quantization=quantization,
        weight_format=weight_format,
        mtp_layers=mtp_layer_count(config),
        vision=bool(config.get("vision_config")),
        hybrid=is_hybrid(config),
        model_type=str(text.get("model_type") or config.get("model_type") or ""),
        source=source,
        config=config,
    )


# --------------------------------------------------------------------------
# Reading the files: local folder, Hugging Face cache, Hub (when allowed)
# --------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: Path | None, online: bool) -> Path | None:
    """The file from the HF cache; from the Hub only when ``online``. None when absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    kwargs = {"revision": revision, "cache_dir": str(cache_dir) if cache_dir else None}
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, **kwargs))
    except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
        pass
    except HFValidationError as exc:
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a Hugging Face repo id: {exc}") from None
    if not online:
        return None
    try:
        return Path(hf_hub_download(repo_id, filename, **kwargs))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # network, auth, offline mode: the caller falls back
        raise CheckpointUnavailable(f"cannot fetch {filename} of {repo_id!r}: {type(exc).__name__}: {exc}") from None


def read_checkpoint(
    model: str, revision: str | None = None, cache_dir: Path | None = None, online: bool = False
) -> CheckpointFacts | None:
    """The facts of a local folder or a hub repo; None when the config is not
    at hand (not cached and ``online`` is False).

    ``cache_dir`` is the hub cache vLLM downloads into (LNARIZE_CACHE_DIR/hub).
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"no config.json in {folder}")
        quant_path = folder / "hf_quant_config.json"
        quant = _read_json(quant_path) if quant_path.is_file() else None
        return detect_checkpoint(_read_json(config_path), quant, source=str(config_path))
    if model.startswith(("/", ".", "~")):
        # A path that is not there (yet): vLLM reports it when it loads.
        raise CheckpointUnavailable(f"no model folder at {model}")
    config_path = _hub_file(model, "config.json", revision, cache_dir, online)
    if config_path is None:
        return None
    try:
        quant_path = _hub_file(model, "hf_quant_config.json", revision, cache_dir, online)
    except CheckpointUnavailable:
        # Optional (ModelOpt repeats it in config.json): a cached config.json
        # is enough when the Hub cannot be asked.
        quant_path = None
    quant = _read_json(quant_path) if quant_path else None
    return detect_checkpoint(_read_json(config_path), quant, source=str(config_path))


# --------------------------------------------------------------------------
# Explicit settings vs the checkpoint
# --------------------------------------------------------------------------


def contradictions(settings: Any, facts: CheckpointFacts) -> list[str]:
    """One line per explicitly given setting the checkpoint contradicts."""
    problems = []
    explicit = settings.explicitly_set
    if "quantization" in explicit and settings.quantization != "auto":
        allowed = COMPATIBLE_VLLM_METHODS.get(facts.quantization, ())
        wrong = settings.quantization not in allowed if facts.quantization != UNQUANTIZED else (
            settings.quantization in CHECKPOINT_FORMAT_METHODS
        )
        if wrong:
            fits = f"use one of {', '.join(allowed)} or auto" if allowed else "use auto"
            problems.append(
                f"LNARIZE_QUANTIZATION={settings.quantization} contradicts the checkpoint, whose weights are "
                f"{facts.quantization} ({facts.source or 'config.json'}): {fits}"
            )
    if "speculative_tokens" in explicit and settings.speculative_tokens > 0 and not facts.has_mtp:
        problems.append(
            f"LNARIZE_SPECULATIVE_TOKENS={settings.speculative_tokens} needs an MTP head, and the checkpoint has "
            f"none (no mtp_num_hidden_layers / num_nextn_predict_layers in {facts.source or 'config.json'}): "
            "set LNARIZE_SPECULATIVE_TOKENS=0"
        )
    return problems
