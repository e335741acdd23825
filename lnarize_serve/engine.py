"""Engine construction: model location, KVTC gate, the vLLM AsyncLLM itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lnarize_serve.engine_args import build_engine_args
from lnarize_serve.settings import DEMO_MODEL_ID, ConfigError, Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from lnarize_serve.gpu import GpuFacts
    from lnarize_serve.launch import LaunchPlan
    from lnarize_serve.vllm_compat.async_engine import AsyncLLM
    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs

logger = logging.getLogger("lnarize_serve.engine")


def check_kvtc_supported(settings: Settings) -> None:
    """Refuse KVTC settings this build cannot honour, with one line per setting
    (the server's fail-fast check; the KVTC resolution runs the same one)."""
    if not settings.kvtc_enable:
        return
    from lnarize_serve.kvtc.serving.serving_setup import KVTCSetupError
    from lnarize_serve.kvtc.serving.serving_setup import check_kvtc_supported as check

    try:
        check(settings)
    except KVTCSetupError as exc:
        raise ConfigError(str(exc)) from None


def model_location_preview(settings: Settings) -> str:
    """Where the model will be loaded from, without downloading or converting anything."""
    if settings.model == DEMO_MODEL_ID:
        from lnarize_serve.demo_model import demo_model_dir

        return str(demo_model_dir(settings.cache_dir))
    return settings.model


def resolve_model_location(settings: Settings) -> str:
    """The model argument for vLLM; converts the demo model on first use (slow, logged)."""
    if settings.model != DEMO_MODEL_ID:
        return settings.model
    from lnarize_serve.demo_model import ensure_demo_model

    return str(ensure_demo_model(cache_dir=settings.cache_dir))


def resolve_launch(
    settings: Settings,
    location: str,
    online: bool,
    probe: Callable[[], GpuFacts | None] | None = None,
) -> LaunchPlan:
    """Family + GPU preset for this start: reads the checkpoint's config
    (local folder or HF cache; the Hub only when ``online``) and probes the GPU.
    Without the config, the preset's assumptions stand and the plan says so."""
    from lnarize_serve.family import CheckpointError, CheckpointUnavailable, read_checkpoint
    from lnarize_serve.gpu import probe_gpu
    from lnarize_serve.launch import plan_launch

    cache = settings.cache_dir / "hub" if settings.cache_dir else None
    note = ""
    try:
        facts = read_checkpoint(location, settings.revision, cache, online=online)
    except CheckpointUnavailable as exc:
        facts, note = None, f"checkpoint config unavailable ({exc}): showing the preset's assumptions"
    except CheckpointError as exc:
        raise ConfigError(f"LNARIZE_MODEL={settings.model}: {exc}") from None
    if facts is None and not note:
        where = "not converted yet" if settings.model == DEMO_MODEL_ID else "not in the Hugging Face cache"
        note = f"checkpoint config {where}: showing the preset's assumptions"
    return plan_launch(settings, facts, (probe or probe_gpu)(), checkpoint_note=note)


@dataclass(frozen=True)
class EngineHandle:
    engine: AsyncLLM
    load_seconds: float


def with_demo_kvtc_calibration(settings: Settings, fit: bool = True) -> Settings:
    """The demo model with KVTC and the default calibration name: its own
    calibration, fitted on first use (the demo folder has no calibration file);
    without ``fit``, where it is or will be."""
    default = Settings.model_fields["kvtc_calibration"].default
    if not (settings.kvtc_enable and settings.model == DEMO_MODEL_ID and settings.kvtc_calibration == default):
        return settings
    from lnarize_serve.demo_model import demo_kvtc_calibration_path, ensure_demo_kvtc_calibration

    path = (ensure_demo_kvtc_calibration if fit else demo_kvtc_calibration_path)(settings.cache_dir)
    return settings.model_copy(update={"kvtc_calibration": str(path)})


def prepare_engine_args(settings: Settings) -> AsyncEngineArgs:
    return prepare_launch(settings)[1]


def prepare_launch(settings: Settings) -> tuple[Settings, AsyncEngineArgs]:
    """The settings as the family and GPU preset adapted them (what the
    frontend serves with) and the engine arguments."""
    import os

    location = resolve_model_location(settings)
    settings = with_demo_kvtc_calibration(settings)
    launch = resolve_launch(settings, location, online=True)
    for name, value in launch.environment.items():
        # The engine processes inherit it; an operator's own value wins.
        os.environ.setdefault(name, value)
    settings = launch.settings
    engine_args = build_engine_args(settings, location, launch)
    if settings.kvtc_enable:
        from lnarize_serve.kvtc.serving.serving_setup import KVTCSetupError, install_kvtc

        try:
            install_kvtc(settings, location, engine_args)
        except KVTCSetupError as exc:
            raise ConfigError(str(exc)) from None
    return settings, engine_args


def start_engine(engine_args: AsyncEngineArgs) -> EngineHandle:
    """Build the AsyncLLM (blocking: loads weights, profiles memory, may compile)."""
    from lnarize_serve.vllm_compat.async_engine import AsyncLLM
    from lnarize_serve.vllm_compat.engine import UsageContext

    started = time.monotonic()
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    from lnarize_serve.cpu_engine import cpu_engine_description

    description = cpu_engine_description(vllm_config)
    if description:
        logger.info(description)
    engine = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats,
    )
    return EngineHandle(engine=engine, load_seconds=time.monotonic() - started)
