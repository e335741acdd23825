"""Strict JSON Schema validation of custom resources against vendored CRDs.

A CRD's `openAPIV3Schema` is Kubernetes' structural OpenAPI dialect; the
conversion here makes it JSON Schema 2020-12 the way the API server reads it
when it prunes and validates:

- an object with `properties` and no `additionalProperties` accepts no other
  field (the API server would silently prune it; here it is an error, as
  `kubectl apply --validate=strict` makes it), unless the node says
  `x-kubernetes-preserve-unknown-fields: true`;
- `nullable: true` admits null; `x-kubernetes-int-or-string` admits both;
- `metadata` is checked against Kubernetes' own strict ObjectMeta schema
  (from kubernetes-validate), not the CRD's bare `type: object`.

CEL rules (`x-kubernetes-validations`) are evaluated separately
(`cel_rules.py`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"
KUBERNETES_VERSION = "1.30"
_OPENAPI_ONLY = {"nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
                 "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                 "x-kubernetes-map-type", "x-kubernetes-embedded-resource"}


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: to_json_schema(value) for key, value in node.items() if key not in _OPENAPI_ONLY}
    unknown_x = sorted(key for key in node if key.startswith("x-") and key not in _OPENAPI_ONLY)
    if unknown_x:
        raise ValueError(f"unhandled OpenAPI extension(s) {unknown_x}")
    if node.get("x-kubernetes-int-or-string"):
        schema["type"] = ["integer", "string"]
    if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        if "properties" in node and "additionalProperties" not in node:
            schema["additionalProperties"] = False
    if node.get("nullable") and "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        schema["type"] = [*types, "null"]
    return schema


@dataclass(frozen=True)
class CustomResourceSchema:
    group: str
    version: str
    kind: str
    open_api: dict  # the version's openAPIV3Schema as shipped

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def load_crds(folder: Path = CRD_DIR) -> dict[tuple[str, str], CustomResourceSchema]:
    """(apiVersion, kind) -> schema, for every served version of every vendored CRD."""
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"{path.name} is not a CustomResourceDefinition")
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                entry = CustomResourceSchema(spec["group"], version["name"], spec["names"]["kind"],
                                             version["schema"]["openAPIV3Schema"])
                found[(entry.api_version, entry.kind)] = entry
    return found


def vendored_file_hashes(folder: Path = CRD_DIR) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.yaml"))}


def pinned_sources(folder: Path = CRD_DIR) -> dict[str, dict[str, str]]:
    return json.loads((folder / "sources.json").read_text())


@cache
def _kubernetes_schema_registry() -> referencing.Registry:
    from importlib.resources import files

    strict = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}.0-local-strict"
    registry = referencing.Registry()
    for name in ("_definitions.json", "objectmeta-meta-v1.json"):
        registry = referencing.Resource.from_contents(json.loads((strict / name).read_text())) @ registry
    return registry


_OBJECT_META = "https://kubernetes.io/api/objectmeta/meta/v1"


def validator(crd: CustomResourceSchema) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(crd.open_api)
    schema["properties"]["metadata"] = {"$ref": _OBJECT_META}
    schema["properties"]["apiVersion"] = {"const": crd.api_version}
    schema["properties"]["kind"] = {"const": crd.kind}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_schema_registry())


def validate_custom_resource(document: dict, crds: dict[tuple[str, str], CustomResourceSchema]) -> None:
    """Raise jsonschema.ValidationError (first error) or KeyError for an unknown apiVersion/kind."""
    crd = crds[(document["apiVersion"], document["kind"])]
    errors = sorted(validator(crd).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        raise errors[0]
