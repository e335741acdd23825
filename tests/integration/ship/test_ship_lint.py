"""The shipped files pass their linters and schemas (tools from the `test` extra)."""

from __future__ import annotations

import subprocess

from shipfiles import REPO_ROOT, tool


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(tool("hadolint"), "--failure-threshold", "info", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_passes_shellcheck_as_posix_sh() -> None:
    result = run_tool(tool("shellcheck"), "--shell=sh", "--severity=style", "entrypoint.sh")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
