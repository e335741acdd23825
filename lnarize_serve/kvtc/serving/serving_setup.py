"""Server side of KVTC: settings -> checked calibration -> engine arguments.

Runs in the server process before vLLM starts: resolves the calibration
source (a local file, or a file in the model repo via huggingface_hub),
converts the shipped pickle format once (through the codec's safe loader) to
our safetensors format, validates it against the model's config, exports the
settings into the engine arguments (vLLM carries them to its processes) and
installs the backend in this process. ``lnarize-serve config`` runs the same
resolution offline, to show the settings the workers will use.

vLLM forks its engine core from this process (its default start method on
CUDA), so nothing here runs torch compute or touches CUDA: the server reads
only the calibration's metadata, and a shipped file is converted in a spawned
helper process. A forked child inherits a torch (OpenMP) thread pool it cannot
use and hangs at its first parallel op, e.g. vLLM's pinned buffers; the
workers load and check the tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lnarize_serve.hf_config import AttentionGeometry
from lnarize_serve.kvtc.format.calibration import (
    Calibration,
    CalibrationError,
    CalibrationSummary,
    read_metadata,
    validate_against_model,
)
from lnarize_serve.kvtc.serving.runtime_config import KVTCRuntimeConfig, enable_in_spawned_processes

if TYPE_CHECKING:
    from lnarize_serve.vllm_compat.engine import AsyncEngineArgs

    from lnarize_serve.settings import Settings

logger = logging.getLogger("lnarize_serve.kvtc")

# vLLM selects the registered backend through this slot on CUDA; on CPU the
# plugin also takes the CPU_ATTN slot (the CPU platform ignores selections).
ATTENTION_BACKEND = "CUSTOM"


class KVTCSetupError(ValueError):
    """KVTC cannot start with these settings; the message names the setting."""


class KVTCUnresolvedOffline(Exception):
    """The calibration is not on this machine yet (the server fetches or
    converts it at start-up); the message says why, in words."""


def unsupported_settings(settings: Settings) -> list[str]:
    """Settings this build's KVTC cannot honour (one line each)."""
    problems = []
    if settings.kv_cache_dtype != "auto":
        problems.append(
            f"invalid setting LNARIZE_KV_CACHE_DTYPE={settings.kv_cache_dtype!r}: KVTC stores its "
            "own compressed slots; use 'auto' with LNARIZE_KVTC_ENABLE"
        )
    if (settings.kvtc_sink_tokens or 0) > 1:
        problems.append(
            f"invalid setting LNARIZE_KVTC_SINK_TOKENS={settings.kvtc_sink_tokens}: this build serves "
            "only the position-0 sink exactly (allowed: 0 or 1; sinks 4 measured the same as 1)"
        )
    return problems


def check_kvtc_supported(settings: Settings) -> None:
    """Refuse KVTC settings this build cannot honour, one line per setting."""
    if not settings.kvtc_enable:
        return
    problems = unsupported_settings(settings)
    if problems:
        raise KVTCSetupError("\n".join(problems))


def kvtc_engine_arg_values(settings: Settings) -> dict[str, Any]:
    """The engine argument KVTC adds (pure); ``additional_config`` comes from
    :func:`resolve_kvtc_runtime`, which needs the calibration file."""
    if not settings.kvtc_enable:
        return {}
    return {"attention_backend": ATTENTION_BACKEND}


def _model_config(model_location: str, revision: str | None, cache_dir: Path | None,
                  online: bool = True) -> dict:
    local = Path(model_location)
    if local.is_dir():
        return json.loads((local / "config.json").read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = hf_hub_download(model_location, "config.json", revision=revision,
                               cache_dir=_hub_dir(cache_dir), local_files_only=not online)
    except LocalEntryNotFoundError:
        if online:
            raise
        raise KVTCUnresolvedOffline(
            f"the model's config.json ({model_location}) is not in the Hugging Face cache; "
            "the server downloads it at start-up"
        ) from None
    return json.loads(Path(path).read_text())


def _hub_dir(cache_dir: Path | None) -> str | None:
    return str(cache_dir / "hub") if cache_dir else None


def calibrate_hint(model_location: str) -> str:
    return (
        f"make one with `lnarize-serve kvtc calibrate --model {model_location} --out "
        "kvtc-calibration.safetensors` and set LNARIZE_KVTC_CALIBRATION to that file"
    )


def resolve_calibration_source(
    source: str, model_location: str, revision: str | None, cache_dir: Path | None,
    online: bool = True,
) -> Path:
    """A local file as is; otherwise the file of that name in the model repo."""
    local = Path(source).expanduser()
    if local.is_file():
        return local
    model_dir = Path(model_location)
    if model_dir.is_dir():
        candidate = model_dir / source
        if candidate.is_file():
            return candidate
        raise KVTCSetupError(
            f"invalid setting LNARIZE_KVTC_CALIBRATION={source!r}: no such file, and the local "
            f"model folder {model_dir} has none of that name; {calibrate_hint(model_location)}"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_location, source, revision=revision,
                                    cache_dir=_hub_dir(cache_dir), local_files_only=not online))
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        if not online and isinstance(exc, LocalEntryNotFoundError):
            raise KVTCUnresolvedOffline(
                f"LNARIZE_KVTC_CALIBRATION={source!r} is not a local file and not in the Hugging "
                f"Face cache for {model_location!r}; the server downloads it from the model repo "
                "at start-up"
            ) from None
        raise KVTCSetupError(
            f"invalid setting LNARIZE_KVTC_CALIBRATION={source!r}: not a local file and not "
            f"downloadable from the model repo {model_location!r} ({type(exc).__name__}: {exc}); "
            f"{calibrate_hint(model_location)}"
        ) from None


def _is_our_format(path: Path) -> bool:
    try:
        read_metadata(path)
    except CalibrationError:
        return False
    return True


def prepare_calibration_file(
    path: Path, model_config: dict, model_id: str, converted_dir: Path, online: bool = True
) -> Path:
    """Our format, validated against the model (from its metadata); shipped
    files are converted once, in a helper process (not when ``online`` is
    off: ``config`` converts nothing)."""
    geometry = AttentionGeometry.from_config(model_config)
    prepared = path
    if not _is_our_format(path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        prepared = converted_dir / f"kvtc-{digest}.safetensors"
        if not prepared.is_file() and not online:
            raise KVTCUnresolvedOffline(
                f"the calibration {path} is in the shipped format and not converted yet; the "
                f"server converts it to {prepared} at start-up"
            )
        if not prepared.is_file():
            logger.info("converting shipped KVTC calibration %s -> %s", path, prepared)
            prepared.parent.mkdir(parents=True, exist_ok=True)
            _convert_in_helper_process(path, geometry, model_id, prepared)
    validate_against_model(CalibrationSummary.read(prepared), geometry)
    return prepared


def _convert_in_helper_process(path: Path, geometry: AttentionGeometry, model_id: str,
                               out: Path) -> None:
    """The conversion is torch compute: a spawned process runs it, so this
    process stays free of torch thread pools (see the module docstring)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from lnarize_serve.kvtc.format.shipped import convert_shipped_file

    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        # the safe loader inside refuses foreign pickles; its error comes back here
        pool.submit(convert_shipped_file, path, geometry, model_id, out).result()


def resolve_sink_tokens(setting: int | None,
                        calibration: Calibration | CalibrationSummary) -> int:
    """LNARIZE_KVTC_SINK_TOKENS against the calibration: unset means 1 when it
    has the position-0 constants (logged either way); 1 without them is an
    error naming the setting."""
    has_constants = calibration.has_sink_constants
    if setting is None:
        logger.info(
            "KVTC sink: %s (LNARIZE_KVTC_SINK_TOKENS unset; the calibration has %sposition-0 "
            "constants)",
            "position 0 served exactly" if has_constants else "compressed like any token",
            "" if has_constants else "no ",
        )
        return int(has_constants)
    if setting and not has_constants:
        raise KVTCSetupError(
            f"invalid setting LNARIZE_KVTC_SINK_TOKENS={setting}: the KVTC calibration has no "
            "position-0 sink constants (refit it with `lnarize-serve kvtc calibrate`, or set "
            "LNARIZE_KVTC_SINK_TOKENS=0 to compress the sink like any token)"
        )
    return setting


def default_converted_dir(cache_dir: Path | None) -> Path:
    from lnarize_serve.demo_model import default_cache_dir

    return (cache_dir or default_cache_dir()) / "kvtc"


@dataclass(frozen=True)
class ResolvedKVTC:
    runtime: KVTCRuntimeConfig
    calibration: CalibrationSummary


def resolve_kvtc_runtime(settings: Settings, model_location: str, online: bool = True,
                         not_there_yet: str | None = None) -> ResolvedKVTC:
    """The KVTC settings the engine's processes will use: the calibration as a
    checked local file in our format, the sink resolved against it, the window.

    The one resolution for the server (``online``: downloads and converts) and
    ``lnarize-serve config`` (offline: raises KVTCUnresolvedOffline where it
    would have to fetch or convert, or with ``not_there_yet``: why the
    calibration is known not to exist yet, e.g. the demo's is fitted at start).
    """
    check_kvtc_supported(settings)
    if not_there_yet:
        raise KVTCUnresolvedOffline(not_there_yet)
    source = resolve_calibration_source(
        settings.kvtc_calibration, model_location, settings.revision, settings.cache_dir, online
    )
    try:
        prepared = prepare_calibration_file(
            source,
            _model_config(model_location, settings.revision, settings.cache_dir, online),
            settings.model,
            default_converted_dir(settings.cache_dir),
            online,
        )
        calibration = CalibrationSummary.read(prepared)
    except CalibrationError as exc:
        raise KVTCSetupError(
            f"invalid setting LNARIZE_KVTC_CALIBRATION={settings.kvtc_calibration!r}: {exc}"
        ) from None
    sink_tokens = resolve_sink_tokens(settings.kvtc_sink_tokens, calibration)
    runtime = KVTCRuntimeConfig(str(prepared.resolve()), sink_tokens, settings.kvtc_window_tokens)
    return ResolvedKVTC(runtime, calibration)


def install_kvtc(settings: Settings, model_location: str, engine_args: AsyncEngineArgs) -> KVTCRuntimeConfig:
    """Resolve, check and install KVTC for the engine about to start.

    Puts the resolved settings in the engine arguments' ``additional_config``
    (inside the VllmConfig every vLLM process receives), switches the plugin on
    for the spawned processes, and registers the backend in this process
    (plugins may have loaded before).
    """
    resolved = resolve_kvtc_runtime(settings, model_location)
    runtime, calibration = resolved.runtime, resolved.calibration
    enable_in_spawned_processes()
    from lnarize_serve.kvtc.serving.plugin import register

    register()
    engine_args.attention_backend = ATTENTION_BACKEND
    engine_args.additional_config = {
        **(engine_args.additional_config or {}),
        **runtime.as_additional_config(),
    }
    logger.info(
        "KVTC on: %s, %d B per token per KV head (%.2fx smaller than bf16), layers %s; "
        "exact: sink %d, window %d (pool beside the cache: %.1f MiB)",
        runtime.calibration_path,
        calibration.slot_bytes,
        4 * calibration.head_dim / calibration.slot_bytes,
        calibration.layer_indices,
        runtime.sink_tokens,
        runtime.window_tokens,
        window_pool_bytes(runtime.window_tokens, settings.max_num_seqs, calibration) / 2**20,
    )
    return runtime


def window_pool_bytes(window_tokens: int, max_num_seqs: int,
                      calibration: Calibration | CalibrationSummary) -> int:
    """Memory of the exact-window pools (all compressed layers, 16-bit K/V),
    which vLLM's KV budget does not include."""
    if not window_tokens:
        return 0
    from lnarize_serve.kvtc.serving.window import pool_entries, pool_rows

    rows = pool_rows(pool_entries(max_num_seqs, window_tokens))
    per_layer = rows * 2 * calibration.num_kv_heads * calibration.head_dim * 2
    return per_layer * len(calibration.layer_indices)
