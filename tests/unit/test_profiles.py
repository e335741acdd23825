"""Presets are found in an installed wheel (lnarize_serve/_profiles) or a source checkout."""

import tomllib
from pathlib import Path

import pytest

from lnarize_serve import profiles

REPO = Path(__file__).resolve().parents[2]


def _write_presets(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in profiles.PROFILE_NAMES:
        (folder / f"{name}.env").write_text("# preset\n")


def test_wheel_layout_wins(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "lnarize_serve"
    _write_presets(package / "_profiles")
    monkeypatch.setattr(profiles, "_PACKAGE_DIR", package)
    assert profiles.profile_path("cpu-demo") == package / "_profiles" / "cpu-demo.env"


def test_source_checkout_fallback(tmp_path, monkeypatch):
    package = tmp_path / "checkout" / "lnarize_serve"
    package.mkdir(parents=True)
    _write_presets(tmp_path / "checkout" / "config" / "profiles")
    monkeypatch.setattr(profiles, "_PACKAGE_DIR", package)
    assert profiles.profile_path("interactive") == tmp_path / "checkout" / "config" / "profiles" / "interactive.env"


def test_missing_presets_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(profiles, "_PACKAGE_DIR", tmp_path / "lnarize_serve")
    with pytest.raises(FileNotFoundError, match="profile presets not found"):
        profiles.profiles_dir()


def test_wheel_build_force_includes_the_presets():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    force_include = config["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include["config/profiles"] == "lnarize_serve/_profiles"
    for name in profiles.PROFILE_NAMES:
        assert (REPO / "config" / "profiles" / f"{name}.env").is_file()
