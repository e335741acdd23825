"""The KVTC settings every vLLM process needs, carried by vLLM's own config.

The server resolves them once (serving_setup.resolve_kvtc_runtime) and puts
them under ``additional_config["lnarize_kvtc"]`` of the engine arguments. The
``VllmConfig`` built from those arguments is pickled into the engine core and
every worker, so each process reads the same values from the config it runs
with; they also enter vLLM's config hash and its printed engine arguments.
The calibration path there is always a local file (the server resolves repo
files before starting the engine).

Only the on/off switch stays in the environment: vLLM loads general plugins
(plugin.register) before any ``VllmConfig`` exists, and the spawned processes
inherit ``LNARIZE_KVTC_ENABLE`` from the server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

ENABLE_VAR = "LNARIZE_KVTC_ENABLE"
ADDITIONAL_CONFIG_KEY = "lnarize_kvtc"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class KVTCConfigError(ValueError):
    """A KVTC setting that cannot work; the message names the setting."""


@dataclass(frozen=True)
class KVTCRuntimeConfig:
    calibration_path: str
    sink_tokens: int = 0
    window_tokens: int = 0

    def as_additional_config(self) -> dict[str, object]:
        """For vLLM's ``additional_config``, which carries it to every process."""
        return {
            ADDITIONAL_CONFIG_KEY: {
                "calibration": self.calibration_path,
                "sink_tokens": self.sink_tokens,
                "window_tokens": self.window_tokens,
            }
        }

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> KVTCRuntimeConfig:
        """Parse what :meth:`as_additional_config` wrote; one error naming the
        malformed entry."""
        where = f"vLLM additional_config[{ADDITIONAL_CONFIG_KEY!r}]"
        section = additional_config.get(ADDITIONAL_CONFIG_KEY) if isinstance(
            additional_config, Mapping) else None
        if not isinstance(section, Mapping):
            raise KVTCConfigError(
                f"{where} is missing or not a mapping ({section!r}): the KVTC attention backend "
                "needs the settings the server resolves (start engines through lnarize-serve, "
                "or pass KVTCRuntimeConfig(...).as_additional_config())"
            )
        path = section.get("calibration")
        if not isinstance(path, str) or not os.path.isfile(path):
            raise KVTCConfigError(
                f"{where}['calibration']={path!r} is not a local file in this process "
                "(the server resolves the calibration before starting vLLM)"
            )
        return cls(path, _count(section, "sink_tokens", where), _count(section, "window_tokens", where))


def _count(section: Mapping[str, Any], name: str, where: str) -> int:
    value = section.get(name, 0)
    # bool is an int in Python; a JSON true here is a mistake, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KVTCConfigError(f"{where}[{name!r}]={value!r} is not an integer >= 0")
    return value


def kvtc_enabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    value = environ.get(ENABLE_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise KVTCConfigError(f"{ENABLE_VAR}={value!r} is not a boolean (use 1/0, true/false)")


def enable_in_spawned_processes(environ: MutableMapping[str, str] | None = None) -> None:
    """Switch the plugin on for the vLLM processes this one will spawn (the
    setting may have come from a flag, not the environment)."""
    (os.environ if environ is None else environ)[ENABLE_VAR] = "1"
