"""scripts/demo and scripts/test: one shared environment set-up, linted, and
the README's first commands are exactly these."""

from __future__ import annotations

import os
import re
import subprocess

from shipfiles import REPO_ROOT, tool

SCRIPTS = ("scripts/demo", "scripts/test", "scripts/lib/env.sh")


def test_scripts_pass_shellcheck() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "-x", "--severity=style", *SCRIPTS],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_demo_and_test_share_one_environment_set_up() -> None:
    for name in ("scripts/demo", "scripts/test"):
        path = REPO_ROOT / name
        assert os.access(path, os.X_OK), name
        text = path.read_text()
        assert ". scripts/lib/env.sh" in text and "lnarize_ensure_env" in text, name
        assert "pip install" not in text, f"{name} installs on its own"
    env_sh = (REPO_ROOT / "scripts/lib/env.sh").read_text()
    # the install stamp covers the recipe itself, so a changed recipe reinstalls
    assert "sha256sum pyproject.toml scripts/lib/env.sh" in env_sh


def test_demo_starts_the_cpu_demo_and_passes_arguments_through() -> None:
    text = (REPO_ROOT / "scripts/demo").read_text()
    assert 'LNARIZE_PROFILE=${LNARIZE_PROFILE:-cpu-demo}' in text
    assert 'VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}' in text
    assert re.search(r'^exec \.venv/bin/lnarize-serve serve "\$@"$', text, re.MULTILINE)


def test_readme_starts_with_the_two_set_up_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    section = re.sub(r"```.*?```", "", section, flags=re.DOTALL)  # the client example
    commands = re.findall(r"^    (\S.*)$", section, re.MULTILINE)
    assert commands == ["docker compose up", "scripts/demo", "scripts/test"], commands
