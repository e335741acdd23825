"""The project's tool-call parser for the Qwen3.5/3.6 XML format: vLLM's
``qwen3_xml`` with arguments fitted to the tool's schema.

A forced call (``tool_choice`` named or ``"required"``) is constrained by
xgrammar's ``qwen_xml`` grammar, which lets whitespace through around each
``<parameter=...>`` value and applies the schema to what lies between (the
chat template itself wraps values in newlines). vLLM's parser trims one
newline on each side and keeps the rest, so a value the grammar held to the
schema can come back outside it: an enum value as ``" celsius\t\r"``, a
12-character string as 15 characters. Here a string value that fails its
property's schema loses its surrounding whitespace when that makes it pass;
values that pass are never touched (free text keeps every character), and
non-string types are coerced by vLLM as before. Keys whose value may be
refitted are not streamed before the value is complete, so streamed and
non-streamed arguments are the same.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from lnarize_serve.vllm_compat.parsers import Qwen3EngineToolParser, Qwen3Parser, ToolParserManager

# Schema keywords that say nothing about which strings are valid.
_ANNOTATIONS = frozenset({"type", "title", "description", "default", "examples", "deprecated"})


def _is_valid(value: Any, schema: dict[str, Any]) -> bool:
    try:
        return jsonschema.Draft202012Validator(schema).is_valid(value)
    except jsonschema.SchemaError:
        return True  # not ours to judge: leave the value as the parser gave it


def fit_to_schema(value: Any, schema: Any) -> Any:
    """``value`` with the grammar's surrounding whitespace removed from every
    string that fails its schema and passes without it; all else unchanged."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped != value and not _is_valid(value, schema) and _is_valid(stripped, schema):
            return stripped
        return value
    if isinstance(value, dict):
        properties = schema.get("properties")
        if isinstance(properties, dict):
            return {k: fit_to_schema(v, properties.get(k)) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [fit_to_schema(item, schema["items"]) for item in value]
    return value


def _constrains_strings(schema: Any) -> bool:
    return isinstance(schema, dict) and bool(set(schema) - _ANNOTATIONS)


class SchemaFittedQwen3Parser(Qwen3Parser):
    @staticmethod
    def _coerce_dict(args: dict, properties: dict) -> tuple[dict, bool]:
        # vLLM's type coercion of the top-level arguments (its `_fix_arg_types`
        # calls this with the tool's properties and re-serializes when
        # `changed`), then the fitting; `args` is changed in place, as there.
        args, changed = Qwen3Parser._coerce_dict(args, properties)
        fitted = fit_to_schema(args, {"properties": properties})
        if fitted != args:
            args.update(fitted)
            changed = True
        return args, changed

    @staticmethod
    def _streamable_string_keys(properties: dict) -> set[str] | None:
        streamable = Qwen3Parser._streamable_string_keys(properties)
        if streamable is None:
            return None
        return {key for key in streamable if not _constrains_strings(properties.get(key))}


# Registered on import too, so plain `vllm serve --tool-parser-plugin <this file>`
# serves the same parser (the benchmark's side-by-side runs).
@ToolParserManager.register_module("qwen3_xml_schema")
class Qwen3XmlSchemaToolParser(Qwen3EngineToolParser):
    _parser_engine_cls = SchemaFittedQwen3Parser


SchemaFittedQwen3Parser.tool_parser_cls = Qwen3XmlSchemaToolParser  # type: ignore[attr-defined]
