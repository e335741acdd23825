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


def test_kubernetes_manifests_match_the_api_schemas_strictly() -> None:
    manifests = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "config" / "k8s").glob("*.yaml"))
    assert manifests, "no manifests under config/k8s"
    result = run_tool(tool("kubernetes-validate"), "--strict", "--kubernetes-version", "1.30", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(manifests), result.stdout
