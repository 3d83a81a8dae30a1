"""JSON schema -> regex: checked with `jsonschema`, compiled with outlines-core's `build_regex_from_schema`, with
the keywords it would silently ignore either implemented here (numeric bounds) or refused (a 400 beats invalid
output)."""

from __future__ import annotations

import copy
import json

import jsonschema
from outlines_core.json_schema import build_regex_from_schema

from .errors import ConstraintError
from .numbers import number_range

WHITESPACE = r"[ ]?"  # JSON whitespace allowed between tokens: compact output, at most one space
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# keywords outlines-core does not enforce; accepting them would let invalid instances through
UNSUPPORTED = ("multipleOf", "not", "if", "then", "else", "contains", "minContains", "maxContains",
               "patternProperties", "dependentRequired", "dependentSchemas", "minProperties", "maxProperties",
               "propertyNames", "unevaluatedProperties", "unevaluatedItems", "dependencies")
DATA = ("enum", "const", "default", "examples")  # values that are instances, not schemas


def canonical(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise ConstraintError(f"json_schema is not a valid JSON schema at {where}: {e.message}") from None
    return json.dumps(schema)  # key order kept: properties come out in the order the schema lists them


def _numeric(node: dict, marks: dict[str, str]):
    """A bounded integer / number schema becomes a const marker whose quoted text is replaced by its regex."""
    types = node.get("type")
    names = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
    numeric = [t for t in names if t in ("integer", "number")]
    if not numeric or "enum" in node or "const" in node or not any(k in node for k in BOUNDS):
        return node
    rx = number_range(node, integer="number" not in numeric)
    if rx is None:
        raise ConstraintError(f"json_schema: no {numeric[0]} satisfies the bounds "
                              f"{ {k: node[k] for k in BOUNDS if k in node} }")
    mark = f"DGEMMANUMBER{len(marks)}X"
    marks[mark] = rx
    rest = [t for t in names if t not in numeric]
    if not rest:
        return {"const": mark}
    other = {k: v for k, v in node.items() if k not in BOUNDS}
    other["type"] = rest if len(rest) > 1 else rest[0]
    return {"anyOf": [{"const": mark}, other]}


# Free-form values ({}, an object without properties, an array without items) stand for bounded-depth JSON: scalars,
# flat arrays and flat objects. outlines-core's unbounded form compiles to thousands of states (seconds per schema
# on a byte vocabulary, far more at V = 262144); this is a subset, so every output still validates.
SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
FLAT = {"anyOf": [*SCALAR["anyOf"], {"type": "array", "items": SCALAR},
                  {"type": "object", "additionalProperties": SCALAR}]}
SCHEMA_MAPS = ("properties", "$defs", "definitions")
SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _walk(node, marks: dict[str, str], path: str):
    """Rewrite one schema (recursively through its subschemas)."""
    if node is True or node == {}:
        return copy.deepcopy(FLAT)
    if not isinstance(node, dict):
        return node
    for k in UNSUPPORTED:
        if k in node:
            raise ConstraintError(f"json_schema keyword {k!r} (at {path or '/'}) is not supported")
    if node.get("uniqueItems") is True:
        raise ConstraintError(f"json_schema keyword 'uniqueItems' (at {path or '/'}) is not supported")
    node = dict(node)
    for k in SCHEMA_MAPS:
        if isinstance(node.get(k), dict):
            node[k] = {name: _walk(v, marks, f"{path}/{k}/{name}") for name, v in node[k].items()}
    for k in SCHEMA_VALUES:
        if isinstance(node.get(k), dict) or node.get(k) is True:
            node[k] = _walk(node[k], marks, f"{path}/{k}")
    for k in SCHEMA_LISTS:
        if isinstance(node.get(k), list):
            node[k] = [_walk(v, marks, f"{path}/{k}/{i}") for i, v in enumerate(node[k])]
    if node.get("type") == "object" and "properties" not in node and node.get("additionalProperties") in (None, FLAT):
        node["additionalProperties"] = copy.deepcopy(FLAT)
    elif node.get("type") == "object" and node.get("additionalProperties") == FLAT:
        node["additionalProperties"] = False  # listed properties only: still valid, and small
    if node.get("type") == "array" and "items" not in node and "prefixItems" not in node:
        node["items"] = copy.deepcopy(FLAT)
    return _numeric(node, marks)


def schema_regex(schema_text: str) -> str:
    """The regex of a canonical schema's JSON instances (compact: at most one space between tokens)."""
    marks: dict[str, str] = {}
    schema = _walk(copy.deepcopy(json.loads(schema_text)), marks, "")
    try:
        regex = build_regex_from_schema(json.dumps(schema), WHITESPACE)
    except BaseException as e:  # outlines-core raises ValueError / TypeError, a Rust panic as BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConstraintError(f"json_schema cannot be compiled: {e}") from None
    for mark, rx in marks.items():
        regex = regex.replace(f'"{mark}"', f"(?:{rx})")
    return regex
