"""Readers for the shipped packaging files (Dockerfile, compose, Kubernetes).

Small, strict parsers: anything they do not understand raises, so a check can
never pass by skipping a construct it did not read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a test tool installed by the `test` extra (in this interpreter's bin dir)."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in {VENV_BIN}; install the test extra: pip install -e '.[test]'")
    return str(path)


# Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(path: Path = REPO_ROOT / "Dockerfile") -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    if pending:
        raise ValueError("Dockerfile ends inside a continued line")
    return instructions


def exec_form(arguments: str) -> list[str]:
    """JSON exec form (["a", "b"]) or raise: shell form would break signals or need a shell."""
    value = json.loads(arguments)
    if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise ValueError(f"not an exec-form JSON array: {arguments}")
    return value


def split_options(arguments: str) -> tuple[dict[str, str], str]:
    """Leading --name=value options of an instruction, and the rest."""
    options: dict[str, str] = {}
    rest = arguments
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.lstrip()
    return options, rest


def key_values(arguments: str) -> dict[str, str]:
    """ENV / LABEL / ARG key=value pairs (quoted values allowed)."""
    pairs = {}
    for token in shlex.split(arguments):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {token!r}")
        pairs[key] = value
    return pairs


# Compose ----------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-)(?P<default>.*))?$", re.S)


def interpolate(value: str, shell: dict[str, str]) -> str:
    """Compose-spec interpolation for the forms this repo uses: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return shell.get(match.group("plain"), "")
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise ValueError(f"unsupported interpolation {match.group(0)!r}")
        name, op, default = braced.group("name", "op", "default")
        if op == ":-":
            return shell.get(name) or default
        if op == "-":
            return shell.get(name, default)
        return shell.get(name, "")

    return _INTERPOLATION.sub(replace, value)


def load_compose(path: Path = REPO_ROOT / "docker-compose.yml") -> dict:
    return yaml.safe_load(path.read_text())


def compose_service(compose: dict) -> dict:
    services = compose["services"]
    if len(services) != 1:
        raise ValueError(f"expected one service, found {sorted(services)}")
    return next(iter(services.values()))


def container_environment(service: dict, shell: dict[str, str]) -> dict[str, str]:
    """The environment compose gives the container for a given shell environment.

    Mapping entries with no value (and list entries without '=') pass the shell's
    value through and are left out when the shell does not set them.
    """
    raw = service.get("environment", {})
    entries: list[tuple[str, str | None]]
    if isinstance(raw, dict):
        entries = [(key, None if value is None else str(value)) for key, value in raw.items()]
    else:
        entries = [(item.partition("=")[0], item.partition("=")[2] if "=" in item else None) for item in raw]
    environment = {}
    for key, value in entries:
        if value is None:
            if key in shell:
                environment[key] = shell[key]
        else:
            environment[key] = interpolate(value, shell)
    return environment


def duration_seconds(text: str) -> float:
    """Compose and Gateway API durations such as '40m', '1m30s', '300s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"unsupported duration {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


# Kubernetes -------------------------------------------------------------------------


K8S_DIR = REPO_ROOT / "config" / "k8s"


def k8s_overlays() -> list[str]:
    return sorted(path.parent.name for path in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))


def k8s_documents(overlay: str) -> list[dict]:
    """An overlay rendered by kustomize (the one built into kubectl, from the `test` extra)."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S_DIR / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def k8s_all(documents: list[dict], kind: str) -> list[dict]:
    return [doc for doc in documents if doc.get("kind") == kind]


def k8s_one(documents: list[dict], kind: str) -> dict:
    found = [doc for doc in documents if doc.get("kind") == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind}, found {len(found)}")
    return found[0]


def clean_lnarize_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without the variables the entrypoint reads (LNARIZE_*, token, caches, GPU), plus `extra`."""
    read_by_entrypoint = (
        "HF_TOKEN", "HF_TOKEN_PATH", "CUDA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_CACHE", "VLLM_CACHE_ROOT",
        "XDG_CACHE_HOME", "ENTRYPOINT_SKIP_GPU_CHECK",
    )
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("LNARIZE_") and key not in read_by_entrypoint
    }
    base.update(extra or {})
    return base
