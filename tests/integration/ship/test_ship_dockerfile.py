"""The Dockerfile's promises, checked against the package it ships (the image is built on a GPU box only)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from shipfiles import (
    REPO_ROOT,
    dockerfile_instructions,
    exec_form,
    k8s_documents,
    k8s_one,
    k8s_overlays,
    key_values,
    split_options,
)


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions()


def only(instructions, keyword):
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def build_args(instructions) -> dict[str, str]:
    values = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            values.update(key_values(instruction.arguments))
    return values


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def pinned_vllm_version() -> str:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [req for req in extras["gpu"] if req.replace(" ", "").startswith("vllm==")]
    return pin.split("==", 1)[1].strip()


def test_base_image_is_the_official_vllm_image_at_the_pinned_version(instructions) -> None:
    base = expand(only(instructions, "FROM").arguments, build_args(instructions))
    assert base == f"vllm/vllm-openai:v{pinned_vllm_version()}"
    # The digest pin goes through the same build arg.
    assert "--build-arg VLLM_IMAGE=vllm/vllm-openai:v" in (REPO_ROOT / "Dockerfile").read_text()


def test_install_pins_the_image_packages_instead_of_re_resolving_them(instructions) -> None:
    install = next(i.arguments for i in instructions if i.keyword == "RUN" and "pip install" in i.arguments)
    assert "pip list --format=freeze > /tmp/image-constraints.txt" in install
    assert "--constraint /tmp/image-constraints.txt" in install
    assert "[gpu]" in install, "the gpu extra makes a base image with another vLLM version fail the build"
    assert "--upgrade" not in install and " -U " not in install


def test_runs_as_a_numeric_non_root_user_that_owns_the_cache_dirs(instructions) -> None:
    args = build_args(instructions)
    user = expand(only(instructions, "USER").arguments, args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0
    create = next(i.arguments for i in instructions if i.keyword == "RUN" and "useradd" in i.arguments)
    assert "chown -R" in create and "/cache" in create
    # Kubernetes runs the pods as the same ids.
    for overlay in k8s_overlays():
        pod = k8s_one(k8s_documents(overlay), "Deployment")["spec"]["template"]["spec"]["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid)), overlay


def test_hf_home_and_vllm_cache_root_are_volumes(instructions) -> None:
    environment = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            environment.update(key_values(instruction.arguments))
    volumes = exec_form(only(instructions, "VOLUME").arguments)
    assert environment["HF_HOME"] in volumes
    assert environment["VLLM_CACHE_ROOT"] in volumes
    compose_text = (REPO_ROOT / "docker-compose.yml").read_text()
    for volume in volumes:
        assert f":{volume}" in compose_text, f"compose mounts no named volume on {volume}"


def test_entrypoint_is_exec_form_and_the_script_is_copied_there(instructions) -> None:
    (entrypoint,) = exec_form(only(instructions, "ENTRYPOINT").arguments)
    copies = [split_options(i.arguments) for i in instructions if i.keyword == "COPY"]
    assert any(rest == f"entrypoint.sh {entrypoint}" and options.get("chmod") == "0755" for options, rest in copies)
    assert exec_form(only(instructions, "CMD").arguments) == ["serve"]


@pytest.mark.vllm  # app_route_paths: the app mounts vLLM's OpenAI routers
def test_healthcheck_uses_python_urllib_on_the_apps_readiness_route(instructions, app_route_paths) -> None:
    options, rest = split_options(only(instructions, "HEALTHCHECK").arguments)
    assert rest.startswith("CMD ")
    command = exec_form(rest[len("CMD ") :])
    assert command[:2] == ["python3", "-c"] and "urllib.request" in command[2]
    assert "curl" not in command[2] and "wget" not in command[2]
    path = re.search(r"'http://127\.0\.0\.1:%s(/[^']*)'", command[2]).group(1)
    assert path == "/health/ready" and path in app_route_paths
    assert {"start-period", "start-interval", "interval", "timeout", "retries"} <= set(options)


def test_healthcheck_command_fails_when_nothing_answers(instructions) -> None:
    # The ready case runs against the real server in tests/e2e/test_ship_container_start.py.
    _, rest = split_options(only(instructions, "HEALTHCHECK").arguments)
    command = exec_form(rest[len("CMD ") :])
    unused_port = "9"  # discard port: nothing listens there
    result = subprocess.run(
        [sys.executable, *command[1:]], env={"LNARIZE_PORT": unused_port}, capture_output=True, timeout=30
    )
    assert result.returncode != 0


def test_oci_labels(instructions) -> None:
    labels = {}
    for instruction in instructions:
        if instruction.keyword == "LABEL":
            labels.update(key_values(instruction.arguments))
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: '*' and '?' stay inside one path segment, '**' spans segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    allowed = True
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            allowed = negated
    return allowed


def test_every_copied_path_exists_and_reaches_the_build_context(instructions) -> None:
    for instruction in instructions:
        if instruction.keyword != "COPY":
            continue
        _, rest = split_options(instruction.arguments)
        *sources, _destination = rest.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), source
            files = [p for p in (REPO_ROOT / source).rglob("*") if p.is_file()] if (REPO_ROOT / source).is_dir() else [REPO_ROOT / source]
            for file in files:
                relative = str(file.relative_to(REPO_ROOT))
                if "__pycache__" in relative:
                    assert not dockerignore_allows(relative)
                    continue
                assert dockerignore_allows(relative), f".dockerignore drops {relative}"
    for private in (".venv/bin/python", "tests/conftest.py", "secrets/hf_token", ".git/HEAD"):
        assert not dockerignore_allows(private), private
