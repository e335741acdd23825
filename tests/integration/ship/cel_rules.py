"""The CRDs' CEL rules (`x-kubernetes-validations`), evaluated with cel-python
the way the API server does on create: defaults applied first, then every
rule on every node of the object that its schema node covers.

Transition rules (they name `oldSelf`) only run on updates and are skipped.
A rule cel-python cannot compile or evaluate is an error, never a pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import celpy


@dataclass(frozen=True)
class RuleFailure:
    path: str
    rule: str
    message: str


def apply_defaults(schema: dict, value: Any) -> Any:
    """Structural defaulting: a missing property with a `default` gets it, recursively."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict, value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in schema.get("properties", {}):
                    _default(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def evaluate_rules(schema: dict, value: Any) -> tuple[list[RuleFailure], int]:
    """(failures, number of rules evaluated) for a defaulted object."""
    environment = celpy.Environment()
    failures: list[RuleFailure] = []
    counter = [0]
    _walk(environment, schema, value, "", failures, counter)
    return failures, counter[0]


def _walk(environment, schema: dict, value: Any, path: str, failures: list[RuleFailure], counter: list[int]) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        counter[0] += 1
        program = environment.program(environment.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, celpy.CELEvalError):
            raise result
        if result is not True and result != celpy.celtypes.BoolType(True):
            failures.append(RuleFailure(path or "/", rule["rule"], rule.get("message", "")))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                _walk(environment, properties[name], item, f"{path}/{name}", failures, counter)
            elif isinstance(schema.get("additionalProperties"), dict):
                _walk(environment, schema["additionalProperties"], item, f"{path}/{name}", failures, counter)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _walk(environment, schema["items"], item, f"{path}/{index}", failures, counter)
