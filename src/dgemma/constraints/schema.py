"""JSON schema -> regex: checked with `jsonschema`, compiled with outlines-core's `build_regex_from_schema`, with
every keyword it would weaken either implemented here (numeric bounds, Draft-4 exclusive bounds, string formats,
anchored patterns) or refused naming the keyword and its path: a 400 beats output that does not validate."""

from __future__ import annotations

import copy
import json
import re

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
# Keywords that describe and never constrain: a subschema of only these accepts any value.
ANNOTATIONS = ("description", "title", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly",
               "$schema", "$id", "$anchor")
COMBINATORS = ("anyOf", "oneOf", "allOf")
# String formats as regexes of valid JSON string content, each a subset of what the format allows (dates stop at the
# 28th so every date exists): exact in the sense that every output validates. Other formats are refused.
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {
    "date-time": _DATE + "T" + _TIME,
    "date": _DATE,
    "time": _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": r"[a-z0-9][a-z0-9._+-]{0,30}@[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?(?:\.[a-z]{2,10}){1,3}",
    "hostname": r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?){0,4}",
    "ipv4": r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])",
    "uri": r"https?://[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?){1,4}"
           r"(?:/[A-Za-z0-9._~-]{1,30}){0,6}",
}


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


def _refuse(keyword: str, path: str, why: str = "is not supported") -> ConstraintError:
    return ConstraintError(f"json_schema keyword {keyword!r} (at {path or '/'}) {why}")


def _safe_pattern(pattern: str, path: str) -> str:
    """A `pattern` as the regex of a JSON string's content: anchors at its ends removed (outlines-core matches the
    whole string), refused when it could write a quote, a backslash or a control character (characters JSON must
    escape; pasted raw they would break the JSON) or when it uses a construct this check cannot see through."""
    inner = pattern[1:] if pattern.startswith("^") else pattern
    if inner.endswith("$") and not inner.endswith("\\$"):
        inner = inner[:-1]
    try:
        tree = re._parser.parse(inner)  # noqa: SLF001 - the standard library's own regex parser
    except re.error as e:
        raise _refuse("pattern", path, f"is not a valid regex ({e})") from None
    bad = {ord('"'), ord("\\"), *range(0x20), 0x7F}

    def may_write_bad(items) -> bool:
        for op, arg in items:
            name = str(op)
            if name in ("ANY", "NOT_LITERAL", "AT"):
                return True  # `.`, [^x] and anchors inside the pattern
            if name == "LITERAL" and arg in bad:
                return True
            if name == "IN":
                if any(str(o) == "NEGATE" for o, _ in arg):
                    return True
                for o, a in arg:
                    if str(o) == "LITERAL" and a in bad or str(o) == "RANGE" and any(a[0] <= b <= a[1] for b in bad):
                        return True
                    if str(o) == "CATEGORY" and str(a) not in ("CATEGORY_DIGIT", "CATEGORY_WORD"):
                        return True  # \s (control characters), \S / \W / \D (quotes)
            if name == "CATEGORY" and str(arg) not in ("CATEGORY_DIGIT", "CATEGORY_WORD"):
                return True
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") and may_write_bad(arg[2]):
                return True
            if name == "SUBPATTERN" and may_write_bad(arg[-1]):
                return True
            if name == "BRANCH" and any(may_write_bad(b) for b in arg[1]):
                return True
            if name in ("GROUPREF", "GROUPREF_EXISTS", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP"):
                return True
        return False

    if may_write_bad(tree):
        raise _refuse("pattern", path, f"{pattern!r} may write a quote, a backslash or a control character (or uses "
                      f"an anchor, look-around or backreference inside); write it with explicit character classes")
    return inner


def _draft4_bounds(node: dict) -> dict:
    """Draft 4's boolean exclusiveMinimum / exclusiveMaximum (a flag on minimum / maximum) in the later form."""
    for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(flag), bool):
            node = dict(node)
            if node.pop(flag) and bound in node:
                node[flag] = node.pop(bound)
    return node


def _disjoint(branches: list) -> bool:
    """oneOf branches no value can match twice: each a different single type, or each a set of constants."""
    types = [b.get("type") if isinstance(b, dict) else None for b in branches]
    if all(isinstance(t, str) for t in types) and len(set(types)) == len(types) and \
            not {"integer", "number"} <= set(types):
        return True
    values = []
    for b in branches:
        if not isinstance(b, dict) or not ("const" in b or "enum" in b) or set(b) - {"const", "enum", *ANNOTATIONS}:
            return False
        values.append([json.dumps(v, sort_keys=True) for v in ([b["const"]] if "const" in b else b["enum"])])
    flat = [v for vs in values for v in vs]
    return len(flat) == len(set(flat))


def _walk(node, marks: dict[str, str], path: str):
    """Rewrite one schema (recursively through its subschemas)."""
    if isinstance(node, dict) and not set(node) - set(ANNOTATIONS):
        node = {}  # only annotations: any value
    if node is True or node == {}:
        return copy.deepcopy(FLAT)
    if not isinstance(node, dict):
        return node
    for k in UNSUPPORTED:
        if k in node:
            raise _refuse(k, path)
    if node.get("uniqueItems") is True:
        raise _refuse("uniqueItems", path)
    node = _draft4_bounds(dict((k, v) for k, v in node.items() if k not in ANNOTATIONS))
    combined = [k for k in COMBINATORS if k in node]
    if combined:
        others = sorted(set(node) - set(COMBINATORS) - {"$defs", "definitions"})
        if len(combined) > 1 or others:
            raise _refuse(combined[0], path, f"beside {', '.join(combined[1:] + others)} is not supported (the "
                          f"compiled form would drop one side); nest them instead")
        if "allOf" in node and len(node["allOf"]) > 1:
            raise _refuse("allOf", path, "with more than one subschema is not supported (merge them into one)")
        if "oneOf" in node and not _disjoint(node["oneOf"]):
            raise _refuse("oneOf", path, "with branches that a value could match twice is not supported (use "
                          "anyOf, or branches of different types or distinct constants)")
    if "format" in node:
        fmt = node["format"]
        if fmt not in FORMATS:
            raise _refuse("format", path, f"{fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        if "pattern" in node or node.get("type", "string") != "string":
            raise _refuse("format", path, "beside pattern, or on a non-string type, is not supported")
        node["pattern"] = FORMATS[node.pop("format")]
    if "pattern" in node:
        if any(k in node for k in ("minLength", "maxLength")):
            raise _refuse("pattern", path, "beside minLength / maxLength is not supported (the compiled form keeps "
                          "only the lengths); put the length into the pattern")
        node["pattern"] = _safe_pattern(node["pattern"], path)
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
