"""Locate the profile presets (``<name>.env``).

An installed wheel carries them as ``lnarize_serve/_profiles`` (hatch
force-include); a source checkout or editable install reads ``config/profiles``.
"""

from __future__ import annotations

from pathlib import Path

PROFILE_NAMES: tuple[str, ...] = ("interactive", "long-context", "cpu-demo")

_PACKAGE_DIR = Path(__file__).resolve().parent


def profiles_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "_profiles", _PACKAGE_DIR.parent / "config" / "profiles"):
        if (candidate / "interactive.env").is_file():
            return candidate
    raise FileNotFoundError(
        "profile presets not found: expected lnarize_serve/_profiles (wheel) or config/profiles (source checkout)"
    )


def profile_path(name: str) -> Path:
    return profiles_dir() / f"{name}.env"
