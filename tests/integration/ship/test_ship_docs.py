"""SERVE.md states facts the code agrees with: setting names, defaults, presets, quoted command output."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from shipfiles import REPO_ROOT, VENV_BIN

from lnarize_serve.settings import Settings, env_name

SERVE_MD = (REPO_ROOT / "SERVE.md").read_text()
SETTING_NAMES = {env_name(name): name for name in Settings.model_fields}


def test_every_lnarize_variable_named_is_a_real_setting() -> None:
    named = set(re.findall(r"\bLNARIZE_[A-Z0-9_]*[A-Z0-9]\b", SERVE_MD))
    assert named, "SERVE.md names no settings?"
    assert named <= set(SETTING_NAMES), sorted(named - set(SETTING_NAMES))


def table_rows(heading: str) -> list[list[str]]:
    section = SERVE_MD.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_kvtc_table_defaults_match_the_settings() -> None:
    rows = table_rows("### KVTC: compressed KV cache")
    assert len(rows) == 4
    for variable, default, _meaning in rows:
        field = SETTING_NAMES[variable.strip("`")]
        expected = Settings.model_fields[field].default
        shown = default.strip("`")
        if expected is None:  # resolved at start-up; the table says "unset"
            assert shown == "unset", variable
        else:
            assert shown == (str(expected).lower() if isinstance(expected, bool) else str(expected)), variable


@pytest.mark.parametrize("profile", ["interactive", "long-context"])
def test_preset_table_matches_the_presets(profile, monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("LNARIZE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LNARIZE_PROFILE", profile)
    settings = Settings()
    (row,) = [r for r in table_rows("| preset | for |") if r[0].startswith(f"`{profile}`")]
    context, _, sequences = row[2].partition(" x ")
    assert int(context.replace(",", "")) == settings.max_model_len
    assert int(sequences) == settings.max_num_seqs
    assert float(row[3]) == settings.gpu_mem_util


def test_quoted_plan_output_is_what_the_command_prints() -> None:
    (block,) = re.findall(r"```text\n\$ (lnarize-serve plan .*?)```", SERVE_MD, re.S)
    command_line, _, quoted = block.replace("\\\n", " ").partition("\n")
    command = shlex.split(command_line)
    command[0] = str(VENV_BIN / "lnarize-serve")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    printed = [line.rstrip() for line in result.stdout.splitlines()]
    for line in quoted.strip().splitlines():
        assert line.rstrip() in printed, f"SERVE.md quotes a line the command does not print: {line!r}"
