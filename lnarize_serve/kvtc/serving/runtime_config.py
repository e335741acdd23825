"""The KVTC settings every vLLM process needs, carried by the environment.

vLLM loads plugins and builds KV cache specs in process 0, the engine core and
each worker, before (or outside) any current ``VllmConfig`` (see
docs/kvtc-vllm.md). The server therefore exports its resolved KVTC settings as
the ``LNARIZE_KVTC_*`` variables of the settings themselves; spawned processes
inherit them. The calibration path in the environment is always a local file
(the server resolves repo files before starting the engine).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

ENABLE_VAR = "LNARIZE_KVTC_ENABLE"
CALIBRATION_VAR = "LNARIZE_KVTC_CALIBRATION"
SINK_VAR = "LNARIZE_KVTC_SINK_TOKENS"
WINDOW_VAR = "LNARIZE_KVTC_WINDOW_TOKENS"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class KVTCConfigError(ValueError):
    """A KVTC setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class KVTCRuntimeConfig:
    calibration_path: str
    sink_tokens: int = 0
    window_tokens: int = 0

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the settings where spawned vLLM processes will read them."""
        target = os.environ if environ is None else environ
        target[ENABLE_VAR] = "1"
        target[CALIBRATION_VAR] = self.calibration_path
        target[SINK_VAR] = str(self.sink_tokens)
        target[WINDOW_VAR] = str(self.window_tokens)

    def as_additional_config(self) -> dict[str, object]:
        """For vLLM's ``additional_config``: enters its config hash and the
        printed engine arguments; the processes read the environment."""
        return {
            "lnarize_kvtc": {
                "calibration": self.calibration_path,
                "sink_tokens": self.sink_tokens,
                "window_tokens": self.window_tokens,
            }
        }


def kvtc_enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    value = environ.get(ENABLE_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise KVTCConfigError(f"{ENABLE_VAR}={value!r} is not a boolean (use 1/0, true/false)")


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name, "0").strip() or "0"
    try:
        value = int(raw)
    except ValueError:
        raise KVTCConfigError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise KVTCConfigError(f"{name}={value} must be >= 0")
    return value


def runtime_config_from_environ(
    environ: Mapping[str, str] | None = None,
) -> KVTCRuntimeConfig | None:
    """The exported settings, or None when KVTC is off in this process."""
    environ = os.environ if environ is None else environ
    if not kvtc_enabled(environ):
        return None
    path = environ.get(CALIBRATION_VAR, "").strip()
    if not path or not os.path.isfile(path):
        raise KVTCConfigError(
            f"{CALIBRATION_VAR}={path!r}: KVTC is enabled but the calibration is not a "
            "local file in this process (the server resolves it before starting vLLM)"
        )
    return KVTCRuntimeConfig(path, _int(environ, SINK_VAR), _int(environ, WINDOW_VAR))
