"""JSON schema -> regex + the keywords a verifier holds.

The schema is checked with `jsonschema`, rewritten here into a schema outlines-core's `build_regex_from_schema`
compiles exactly (every output it admits validates), and compiled. What a regex cannot say is handled three ways:

- rewritten to an exact subset: numeric bounds and `multipleOf` (number regexes), formats (regexes of a subset of
  each RFC's strings), `allOf` merged, `anyOf` / `oneOf` beside other keywords distributed into the branches,
  `$ref` inlined (recursive ones cut at a depth bound: the recursion stops where the schema lets it, an optional
  property or an empty array), `minProperties` as more required properties, `dependentRequired` as required
  properties, `patternProperties` and `additionalProperties` schemas on required names;
- held by the verifier (`verify.py`): `uniqueItems`, `not`, `if` / `then` / `else`, `contains`, `propertyNames`,
  `dependentSchemas`, overlapping `oneOf`, `maxProperties`, lengths beside a pattern or format, ... are dropped from
  the regex and checked on the decoded canvas, which re-noises the offending span;
- refused naming the keyword and its path (`ConstraintError`): what neither can hold (remote `$ref`,
  `$dynamicRef`, conflicting `allOf` parts, unsatisfiable schemas).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields

import jsonschema
from outlines_core.json_schema import build_regex_from_schema

from .errors import ConstraintError
from .numbers import number_range

WHITESPACE = r"[ ]?"  # JSON whitespace allowed between tokens: compact output, at most one space
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Keywords the regex does not hold and the verifier does (checked on the decoded output, see verify.py).
VERIFIED = ("not", "if", "then", "else", "contains", "minContains", "maxContains", "dependentSchemas",
            "propertyNames", "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "maxProperties",
            "minProperties", "dependencies", "dependentRequired", "patternProperties")
# Keywords that describe and never constrain: a subschema of only these accepts any value.
ANNOTATIONS = ("description", "title", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly",
               "$schema", "$id", "$anchor", "id", "contentEncoding", "contentMediaType", "contentSchema",
               "$vocabulary", "$dynamicAnchor", "$recursiveAnchor", "example", "discriminator", "nullable")
# What outlines-core compiles exactly once the rewriting below is done; any other key is an annotation (JSON
# Schema ignores unknown keywords) and is dropped before it sees the schema.
OUTLINES = ("type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
            "maxItems", "minLength", "maxLength", "pattern", "enum", "const", "anyOf")
REFUSED = ("$dynamicRef", "$recursiveRef")
COMBINATORS = ("anyOf", "oneOf", "allOf")
MAX_REF_DEPTH = 2  # a recursive $ref is expanded this many times along one path, then cut
MAX_BRANCHES = 64  # anyOf x oneOf products beside other keywords
# Counted repeats compile to automaton states per count (up to 4 per character of UTF-8): larger upper bounds
# (maxLength, maxItems, {m,n} in a pattern) are lowered to these (a subset of the valid values; an output of 1024
# tokens holds no more anyway).
LENGTH_CAP = 64
ITEMS_CAP = 32

# String formats as regexes of valid JSON string content, each a subset of what its RFC allows (dates stop at the
# 28th so every date exists; no character JSON must escape). Formats not listed are annotations (JSON Schema's
# validators ignore unknown formats) and constrain nothing.
_DATE = r"(?:19|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[a-z](?:[a-z0-9-]{0,20}[a-z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL}){{0,3}}\.[a-z]{{2,6}}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9a-f]{1,4}"
_SEG = r"[A-Za-z0-9._~-]{1,20}"
_URI = rf"https?://{_HOST}(?:/{_SEG}){{0,5}}/?(?:\?[a-z0-9_]{{1,10}}=[A-Za-z0-9._~-]{{0,20}})?"
FORMATS = {
    "date-time": _DATE + "T" + _TIME,
    "date": _DATE,
    "time": _TIME,
    "duration": r"P(?:[1-9][0-9]{0,3}(?:Y|M|W|D)|T[1-9][0-9]{0,3}(?:H|M|S))",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    "email": rf"[a-z0-9](?:[a-z0-9_+-]{{0,20}}[a-z0-9])?(?:\.[a-z0-9]{{1,20}}){{0,2}}@{_HOST}",
    "idn-email": rf"[a-z0-9](?:[a-z0-9_+-]{{0,20}}[a-z0-9])?@{_HOST}",
    "hostname": _HOST,
    "idn-hostname": _HOST,
    "ipv4": _IPV4,
    # full form (8 groups) or :: with up to 6 groups on either side, or an IPv4 tail (RFC 4291 2.2)
    "ipv6": rf"(?:{_H16}:){{7}}{_H16}|(?:{_H16}:){{1,6}}:{_H16}|::(?:{_H16}:){{0,5}}{_H16}|::ffff:{_IPV4}",
    "uri": _URI,
    "iri": _URI,
    "uri-reference": rf"{_URI}|(?:/{_SEG}){{1,5}}",
    "iri-reference": rf"{_URI}|(?:/{_SEG}){{1,5}}",
    "uri-template": _URI,
    "json-pointer": r"(?:/(?:[A-Za-z0-9_-]|~[01]){0,20}){0,6}",
    "relative-json-pointer": r"(?:0|[1-9][0-9]{0,3})(?:#|(?:/(?:[A-Za-z0-9_-]|~[01]){0,20}){0,6})",
    "regex": r"[a-z0-9]{1,20}",
}


class _Unsat(Exception):
    """A subschema no value satisfies (a recursion cut, an empty type intersection, ...), with where and why."""

    def __init__(self, keyword: str, path: str, why: str):
        super().__init__(why)
        self.keyword, self.path, self.why = keyword, path, why


def canonical(schema) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"json_schema is not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "the top level"
        raise ConstraintError(f"json_schema is not a valid JSON schema at {where}: {e.message}") from None
    return json.dumps(schema)  # key order kept: properties come out in the order the schema lists them


def _refuse(keyword: str, path: str, why: str = "is not supported") -> ConstraintError:
    return ConstraintError(f"json_schema keyword {keyword!r} (at {path or '/'}) {why}")


def _env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ConstraintError(f"{name} must be a number, got {value!r}") from None


def _limit(env: str, default: float, kind: type, help: str):
    """A compile limit with a flag (`--compile-<name>` of `dgemma generate` and `dgemma serve`, derived from the
    field) and an environment variable that sets its default."""
    return field(default_factory=lambda: kind(_env(env, default)),
                 metadata={"kind": kind, "env": env, "default": default, "help": help})


@dataclass
class CompileLimits:
    """Bounds on compiling one constraint; past one the constraint is refused (a ConstraintError naming the
    schema path that blew up), never a MemoryError or a hang. The first three are the flags `--compile-seconds`,
    `--compile-memory-mb`, `--compile-states` (`flag_name`), with defaults from the environment:
    DGEMMA_COMPILE_SECONDS, DGEMMA_COMPILE_MEMORY_MB, DGEMMA_COMPILE_STATES."""

    seconds: float = _limit("DGEMMA_COMPILE_SECONDS", 30.0, float, "seconds to compile one constraint (schema "
                            "rewriting and the automaton's index)")
    memory_mb: float = _limit("DGEMMA_COMPILE_MEMORY_MB", 1024.0, float, "MB of memory to build one constraint's "
                              "automaton index")
    states: int = _limit("DGEMMA_COMPILE_STATES", 200_000, int, "automaton states of one constraint")
    regex_chars: int = 2_000_000  # the schema's regex
    nodes: int = 20_000  # subschemas visited while rewriting ($ref expansions included)

    @staticmethod
    def flag_name(name: str) -> str:
        return "--compile-" + name.replace("_", "-")

    @classmethod
    def raise_hint(cls, name: str) -> str:
        """How to raise limit `name`, for a refusal's message."""
        f = next(f for f in fields(cls) if f.name == name)
        return f"{cls.flag_name(name)} or {f.metadata['env']}"

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{self.flag_name(f.name) if 'env' in f.metadata else f.name} must be a positive "
                                 f"number, got {v!r}")


@dataclass
class CompiledSchema:
    regex: str
    checks: list[tuple[str, str]] = field(default_factory=list)  # (path, keyword) the verifier holds
    largest: str = "/"  # the path of the subschema that makes most of the regex (named when a limit is hit)


# Free-form values ({}, an object without properties, an array without items) stand for bounded-depth JSON: scalars,
# flat arrays and flat objects. outlines-core's unbounded form compiles to thousands of states (seconds per schema
# on a byte vocabulary, far more at V = 262144); this is a subset, so every output still validates.
SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
FLAT = {"anyOf": [*SCALAR["anyOf"], {"type": "array", "items": SCALAR},
                  {"type": "object", "additionalProperties": SCALAR}]}


_RUST_META = set("\\.+*?()|[]{}^$#&-~")
_CLASS_META = set("\\[]^-&~")
_BAD = '"\\\\\\x00-\\x1f'  # inside a class: what a JSON string cannot hold raw (quote, backslash, controls)
_CATEGORIES = {"CATEGORY_DIGIT": "0-9", "CATEGORY_WORD": "0-9A-Za-z_", "CATEGORY_SPACE": " "}
_NOT_CATEGORIES = {"CATEGORY_NOT_DIGIT": "0-9", "CATEGORY_NOT_WORD": "0-9A-Za-z_", "CATEGORY_NOT_SPACE": " "}
_JSON_ESCAPES = {0x22: '\\\\"', 0x5C: "\\\\\\\\", 0x08: "\\\\b", 0x0C: "\\\\f", 0x0A: "\\\\n",
                 0x0D: "\\\\r", 0x09: "\\\\t"}


def _lit(c: int, in_class: bool = False) -> str:
    ch = chr(c)
    return "\\" + ch if ch in (_CLASS_META if in_class else _RUST_META) else ch


def _json_char(c: int) -> str:
    """The regex of character `c` as JSON string text (escaped where JSON must escape it)."""
    if c in _JSON_ESCAPES:
        return _JSON_ESCAPES[c]
    if c < 0x20:
        return f"\\\\u{c:04x}"
    return _lit(c)


class _PatternError(Exception):
    pass


def _emit(items, top: bool = False) -> str:
    """A parsed Python regex (re._parser) as a regex of JSON string text that matches a subset of its strings:
    characters JSON escapes are written escaped, `.` and negated classes leave out the quote, the backslash and
    control characters, `\\s` is a space. Anchors are allowed only at the ends."""
    items = list(items)
    out = []
    for n, (op, arg) in enumerate(items):
        name = str(op)
        if name == "LITERAL":
            out.append(_json_char(arg))
        elif name == "NOT_LITERAL":
            out.append(f"[^{_lit(arg, True)}{_BAD}]")
        elif name == "ANY":
            out.append(f"[^{_BAD}]")
        elif name == "IN":
            out.append(_emit_class(arg))
        elif name == "CATEGORY":
            out.append(_emit_class([(op, arg)]))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = arg
            if hi != re._constants.MAXREPEAT and hi > LENGTH_CAP:  # noqa: SLF001
                hi = max(lo, LENGTH_CAP)  # fewer repeats: a subset, and no automaton of thousands of states
            hi_text = "" if hi == re._constants.MAXREPEAT else str(hi)  # noqa: SLF001
            out.append(f"(?:{_emit(sub)}){{{lo},{hi_text}}}")
        elif name == "SUBPATTERN":
            if arg[1] or arg[2]:
                raise _PatternError("inline flags")
            out.append(f"(?:{_emit(arg[3])})")
        elif name == "BRANCH":
            out.append("(?:" + "|".join(_emit(b, top) for b in arg[1]) + ")")
        elif name == "AT" and top and (n == 0 or n == len(items) - 1) and str(arg) in (
                "AT_BEGINNING", "AT_BEGINNING_STRING", "AT_END", "AT_END_STRING"):
            continue  # the whole string is generated: an anchor at an end holds
        else:
            raise _PatternError(name.lower())
    return "".join(out)


def _emit_class(items) -> str:
    negate = any(str(o) == "NEGATE" for o, _ in items)
    pos, neg = [], []  # members; negated categories inside a positive class become alternatives
    for o, a in items:
        o = str(o)
        if o == "NEGATE":
            continue
        if o == "LITERAL":
            if negate or not (a in _JSON_ESCAPES or a < 0x20):
                pos.append(_lit(a, True))
        elif o == "RANGE":
            lo, hi = a
            if negate:
                pos.append(f"{_lit(lo, True)}-{_lit(hi, True)}")
            else:  # the part of the range JSON writes raw (no quote, backslash or control character)
                for a0, a1 in ((lo, min(hi, 0x21)), (max(lo, 0x23), min(hi, 0x5B)), (max(lo, 0x5D), hi)):
                    a0 = max(a0, 0x20)
                    if a0 <= a1:
                        pos.append(f"{_lit(a0, True)}-{_lit(a1, True)}")
        elif o == "CATEGORY":
            a = str(a)
            if a in _CATEGORIES:
                pos.append(_CATEGORIES[a])
            elif a in _NOT_CATEGORIES and not negate:
                neg.append(f"[^{_NOT_CATEGORIES[a]}{_BAD}]")
            else:
                raise _PatternError("negated category in a negated class")
        else:
            raise _PatternError(o.lower())
    if negate:
        return f"[^{''.join(pos)}{_BAD}]"
    alts = ([f"[{''.join(pos)}]"] if pos else []) + neg
    if not alts:
        raise _PatternError("a class of characters JSON must escape")
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _pattern_with_length(pattern: str, lo: int, hi: int | None, path: str) -> str | None:
    """A pattern that is one character class repeated (`^[a-z0-9_]+$`, `\\d{3,}`) with minLength / maxLength
    folded into the count, exactly; None for other patterns."""
    items = [it for it in re._parser.parse(pattern) if str(it[0]) != "AT"]  # noqa: SLF001
    if len(items) != 1 or str(items[0][0]) not in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        return None
    rlo, rhi, sub = items[0][1]
    sub = list(sub)
    if len(sub) != 1 or str(sub[0][0]) not in ("IN", "LITERAL", "ANY", "CATEGORY", "NOT_LITERAL"):
        return None
    if any(str(op) == "AT" and str(arg) not in ("AT_BEGINNING", "AT_END", "AT_BEGINNING_STRING", "AT_END_STRING")
           for op, arg in re._parser.parse(pattern)):  # noqa: SLF001
        return None
    if not pattern.startswith("^") or not pattern.endswith("$"):
        return None  # a search: the match may be part of a longer string; the count alone says nothing
    a = max(rlo, lo)
    b = min(x for x in (rhi if rhi != re._constants.MAXREPEAT else None, hi) if x is not None) \
        if (hi is not None or rhi != re._constants.MAXREPEAT) else None  # noqa: SLF001
    if b is not None and a > b:
        raise _Unsat("pattern", path, f"the pattern's {rlo}..{rhi} characters and minLength / maxLength meet nowhere")
    if b is not None and b > LENGTH_CAP:
        b = max(a, LENGTH_CAP)
    try:
        unit = _emit(sub)
    except _PatternError as e:
        raise _refuse("pattern", path, f"{pattern!r} uses {e} (not supported)") from None
    return f"(?:{unit}){{{a},{'' if b is None else b}}}"


def _safe_pattern(pattern: str, path: str) -> str:
    """A `pattern` as the regex of a JSON string's text matching a subset of its strings (see `_emit`): a pattern
    is a search, the string generated is one whole match (anchors at the ends hold). Refused, naming the
    keyword and path, for look-arounds, backreferences, anchors inside and inline flags."""
    try:
        tree = re._parser.parse(pattern)  # noqa: SLF001 - the standard library's own regex parser
    except re.error as e:
        raise _refuse("pattern", path, f"is not a valid regex ({e})") from None
    items = list(tree)
    if len(items) == 1 and str(items[0][0]) == "BRANCH":
        items = [items[0]]
    try:
        return _emit(items, top=True)
    except _PatternError as e:
        raise _refuse("pattern", path, f"{pattern!r} uses {e} (not supported)") from None


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


def _separate(branches: list[tuple[str, object]], pure: bool) -> list[int] | None:
    """Make oneOf branches that differ in their required properties exclusive: branch i leaves out one property
    that branch j requires and i does not, so no value of i has all of j's. `pure`: the branches are only
    `required` lists beside shared keywords, so a branch whose names include all of another's matches both
    whenever it matches at all, and is dropped. Edits the branches in place (each keeps a subset of its values)
    and returns the branches kept; None when some pair cannot be told apart this way (the verifier holds it)."""
    reqs = [set(b.get("required", [])) if isinstance(b, dict) else None for _, b in branches]
    if any(r is None for r in reqs):
        return None
    drops: list[set] = [set() for _ in branches]
    keep = []
    for i, (_, b) in enumerate(branches):
        ok = True
        for j in range(len(branches)):
            if i == j:
                continue
            only_j = sorted(reqs[j] - reqs[i])
            if not only_j:
                if pure:
                    ok = False  # every value of branch i also matches branch j
                    break
                return None
            if b.get("additionalProperties", True) is not False and not b.get("properties"):
                return None
            drops[i].add(only_j[0])
        if ok:
            keep.append(i)
    for i in keep:
        b = branches[i][1]
        b["properties"] = {k: v for k, v in (b.get("properties") or {}).items() if k not in drops[i]}
        b["additionalProperties"] = False  # only the listed properties are written anyway (a subset)
    return keep


def _types(node: dict) -> list[str] | None:
    t = node.get("type")
    return [t] if isinstance(t, str) else list(t) if isinstance(t, list) else None


def _multiples(node: dict, integer: bool, path: str) -> str | None:
    """`multipleOf` (with the bounds beside it) as an alternation of up to 48 of its values, each checked with
    jsonschema's own arithmetic (0.07 / 0.01 is not an integer in floating point): a subset, exact."""
    m = node["multipleOf"]
    lo = max([v for v in (node.get("minimum"), node.get("exclusiveMinimum")) if v is not None], default=None)
    hi = min([v for v in (node.get("maximum"), node.get("exclusiveMaximum")) if v is not None], default=None)
    if lo is not None:
        k0 = math.ceil(lo / m)
        ks = range(k0, k0 + 200)
    elif hi is not None:
        k0 = math.floor(hi / m)
        ks = range(k0, k0 - 200, -1)
    else:
        ks = [0, *itertools.chain.from_iterable((k, -k) for k in range(1, 100))]
    digits = max(0, -math.floor(math.log10(abs(m)))) + 2 if m < 1 else 0
    check = jsonschema.Draft202012Validator({k: node[k] for k in ("multipleOf", *BOUNDS) if k in node} |
                                            {"type": "integer" if integer else "number"})
    out: list[str] = []
    for k in ks:
        v = k * m
        text = str(int(round(v))) if float(v).is_integer() else f"{v:.{digits}f}".rstrip("0").rstrip(".")
        if text in out or text == "-0":
            continue
        if check.is_valid(json.loads(text)):
            out.append(text)
            if len(out) == 48:
                break
    if not out:
        raise _Unsat("multipleOf", path, f"no value of multipleOf {m} found within the bounds")
    return "|".join(re.escape(t) for t in out)


def _search(pattern: str, name: str, path: str) -> bool:
    """Whether a patternProperties pattern matches a property name (a search, as JSON Schema says)."""
    try:
        return re.search(pattern, name) is not None
    except re.error as e:
        raise _refuse("patternProperties", path, f"pattern {pattern!r} is not a valid regex ({e})") from None


_TYPE_KEYWORDS = {"object": ("properties", "required", "additionalProperties"),
                  "array": ("items", "prefixItems", "minItems", "maxItems"),
                  "string": ("pattern", "minLength", "maxLength"),
                  "number": (*BOUNDS, "multipleOf")}
REFS_KEY = "$dgemmaExpandedRefs"  # inside a merged schema: the $refs expanded to make it
MEMBERS_KEY = "$dgemmaMembers"  # on a free object: (minProperties, maxProperties) its regex holds


def _tag(node, refs: tuple):
    """`node` carrying the $refs expanded to build it (see REFS_KEY)."""
    if not refs or not isinstance(node, dict):
        return node
    return {**node, REFS_KEY: [*node.get(REFS_KEY, ()), *refs]}


class _Compiler:
    def __init__(self, root, limits: CompileLimits):
        self.root = root
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.marks: dict[str, str] = {}
        self.checks: list[tuple[str, str]] = []
        self.nodes = 0
        self.sizes: dict[str, int] = {}  # regex characters made at each path (named when a limit is hit)
        self.expanded: dict[str, int] = {}  # each mark's regex length with the marks inside it substituted

    def mark(self, regex: str, path: str) -> dict:
        """A const marker whose quoted text is replaced by `regex` after outlines-core compiled the schema."""
        name = f"DGEMMAMARK{len(self.marks)}X"
        self.marks[name] = regex
        inner = re.findall(r"DGEMMAMARK\d+X", regex)  # marks inside: their expanded text counts
        self.expanded[name] = len(regex) + sum(self.expanded[m] - len(m) - 2 for m in inner)
        self.sizes[path or "/"] = max(self.sizes.get(path or "/", 0), self.expanded[name])
        return {"const": name}

    def largest(self) -> str:
        """Where a schema that blew a limit is largest: the part (below the top) that makes most of its regex."""
        total = self.sizes.get("/", 0) or max(self.sizes.values(), default=0)
        parts = [(size, path) for path, size in self.sizes.items() if path != "/"]
        if not parts or not total:
            return "/"
        size, path = max(parts)
        return f"{path} ({min(100, round(100 * size / total))}% of it)"

    def check(self, path: str, keyword: str) -> None:
        if (path, keyword) not in self.checks:
            self.checks.append((path, keyword))

    # -- $ref ------------------------------------------------------------------------------------------------------
    def resolve(self, ref: str, path: str):
        if not ref.startswith("#"):
            raise _refuse("$ref", path, f"{ref!r} points outside the schema (only local references, '#...', are "
                          f"compiled)")
        target = self.root
        for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
            part = part.replace("~1", "/").replace("~0", "~")
            part = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), part)
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise _refuse("$ref", path, f"{ref!r} does not resolve inside the schema")
        return target

    def expand(self, node, path: str, refs: tuple):
        """`node` with a top-level $ref replaced by its target (siblings merged in), as (node, refs)."""
        while True:
            if isinstance(node, dict) and REFS_KEY in node:
                node = dict(node)
                refs = (*refs, *node.pop(REFS_KEY))
            if not (isinstance(node, dict) and "$ref" in node):
                return node, refs
            ref = node["$ref"]
            if refs.count(ref) >= MAX_REF_DEPTH:
                raise _Unsat("$ref", path, f"recursive reference {ref!r} cut after {MAX_REF_DEPTH} expansions")
            refs = (*refs, ref)
            target = self.resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref" and k not in ANNOTATIONS and
                    k not in ("$defs", "definitions")}
            node = self.merge(target, rest, path, refs) if rest else target

    # -- allOf: merging two schemas into one whose instances are those of both (or a subset) ---------------------
    def merge(self, a, b, path: str, refs: tuple):
        """The merged schema; the $refs expanded on the way travel inside it (REFS_KEY) so that the walk counts
        them towards the recursion bound."""
        base = refs
        a, refs = self.expand(a, path, refs)
        b, refs = self.expand(b, path, refs)
        if a is False or b is False:
            raise _Unsat("allOf", path, "a part is the false schema")
        if isinstance(a, dict):
            a = dict(a)
            refs = (*refs, *a.pop(REFS_KEY, ()))
        if isinstance(b, dict):
            b = dict(b)
            refs = (*refs, *b.pop(REFS_KEY, ()))
        new = refs[len(base):]
        if a is True or a == {}:
            return _tag(b, new)
        if b is True or b == {}:
            return _tag(a, new)
        a, b = _draft4_bounds(a), _draft4_bounds(b)
        out = dict(a)
        for k, v in b.items():
            if k in ANNOTATIONS or k in ("$defs", "definitions"):
                continue
            if k not in out:
                out[k] = v
                continue
            u = out[k]
            if u == v:
                continue
            if k == "type":
                ta, tb = _types(a), _types(b)
                common = [t for t in ta if t in tb] + (["integer"] if "integer" in ta and "number" in tb or
                                                       "number" in ta and "integer" in tb else [])
                if not common:
                    raise _Unsat("type", path, f"allOf parts of types {ta} and {tb} have no value in common")
                out[k] = sorted(set(common)) if len(set(common)) > 1 else common[0]
            elif k == "properties":
                out[k] = dict(u)
                for name, s in v.items():
                    if name not in u:
                        out[k][name] = s
                    elif s is False or u[name] is False:
                        out[k][name] = False  # the property must be absent
                    else:
                        out[k][name] = self.merge(u[name], s, f"{path}/properties/{name}", refs)
            elif k == "required":
                out[k] = list(dict.fromkeys([*u, *v]))
            elif k in ("items", "additionalProperties", "not") and isinstance(u, (dict, bool)) and \
                    isinstance(v, (dict, bool)):
                if k == "not":
                    out[k] = {"anyOf": [u, v]}
                elif u is False or v is False:
                    out[k] = False
                else:
                    out[k] = self.merge(u, v, f"{path}/{k}", refs)
            elif k in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains"):
                out[k] = max(u, v)
            elif k in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains"):
                out[k] = min(u, v)
            elif k == "uniqueItems":
                out[k] = bool(u or v)
            elif k == "enum":
                keep = [x for x in u if json.dumps(x, sort_keys=True) in {json.dumps(y, sort_keys=True) for y in v}]
                if not keep:
                    raise _Unsat("enum", path, "allOf parts' enums have no value in common")
                out[k] = keep
            elif k == "allOf":
                out[k] = [*u, *v]
            elif k in ("anyOf", "oneOf"):
                out.setdefault("allOf", []).append({k: v})
            else:
                raise _refuse("allOf", path, f"parts with different {k!r} ({json.dumps(u)[:60]} and "
                              f"{json.dumps(v)[:60]}) cannot be merged")
        if "required" in out and isinstance(out.get("additionalProperties"), bool) and \
                not out["additionalProperties"]:
            missing = [n for n in out["required"] if n not in out.get("properties", {})]
            if missing and not out.get("patternProperties"):
                raise _Unsat("required", path, f"{missing} required but additionalProperties is false")
        return _tag(out, new)

    # -- the walk ----------------------------------------------------------------------------------------------------
    def walk(self, node, path: str, refs: tuple = ()):
        """The rewritten subschema (outlines-core's subset), raising _Unsat where no value can satisfy it."""
        self.nodes += 1
        if self.nodes > self.limits.nodes:
            raise ConstraintError(f"json_schema expands to more than {self.limits.nodes} subschemas ($ref "
                                  f"expansions and oneOf/anyOf combinations included; limit reached at {path or '/'})")
        if time.monotonic() > self.deadline:
            raise ConstraintError(f"json_schema took more than {self.limits.seconds:g} s to compile (at {path or '/'})"
                                  f"; simplify the schema there or raise {CompileLimits.raise_hint('seconds')}")
        node, refs = self.expand(node, path, refs)
        if node is False:
            raise _Unsat("false", path, "the false schema admits no value")
        if node is True or not isinstance(node, dict):
            return copy.deepcopy(FLAT)
        for k in REFUSED:
            if k in node:
                raise _refuse(k, path)
        node = _draft4_bounds({k: v for k, v in node.items() if k not in ANNOTATIONS})
        node.pop("$defs", None)
        node.pop("definitions", None)
        if not node:
            return copy.deepcopy(FLAT)
        if "if" in node and ("then" in node or "else" in node):
            cond, then, other = node.pop("if"), node.pop("then", True), node.pop("else", True)
            negated = self.negation(cond, node, path, refs)
            if negated is None:
                self.check(path, "if")  # the else branch's "not if" is the verifier's
            branches = [{"allOf": [cond, then]}, {"allOf": [negated, other]} if negated is not None else other]
            node.setdefault("allOf", []).append({"anyOf": branches})
        elif "if" in node:
            node.pop("if")  # if alone constrains nothing
        if "allOf" in node:
            parts = node.pop("allOf")
            for i, p in enumerate(parts):
                node = self.merge(node, p, f"{path}/allOf/{i}", refs)
            return self.walk(node, path, refs)
        combined = [k for k in ("anyOf", "oneOf") if k in node]
        siblings = {k: v for k, v in node.items() if k not in combined}
        if combined:
            lists = [[(k, i, b) for i, b in enumerate(node[k])] for k in combined]
            branches = list(itertools.product(*lists))
            if len(branches) > MAX_BRANCHES:
                raise _refuse(combined[0], path, f"beside {combined[1]} makes {len(branches)} combinations (limit "
                              f"{MAX_BRANCHES})")
            merged_all = []
            for combo in branches:
                where = path + "/" + "/".join(f"{k}/{i}" for k, i, _ in combo)
                try:
                    merged = siblings
                    for _, _, b in combo:
                        merged = self.merge(merged or {}, b, where, refs)
                except _Unsat:
                    continue  # a branch no value satisfies is left out
                merged_all.append((where, dict(merged) if isinstance(merged, dict) else merged))
            disjoint = combined == ["oneOf"] and len(merged_all) == len(node["oneOf"]) and \
                _disjoint([{k: v for k, v in m.items() if k != REFS_KEY} if isinstance(m, dict) else m
                           for _, m in merged_all])  # after $refs are expanded and siblings merged in
            if "oneOf" in node and not disjoint:
                pure = all(isinstance(b, dict) and not set(b) - {"required", *ANNOTATIONS} for b in node["oneOf"])
                kept = _separate(merged_all, pure) if len(combined) == 1 and \
                    len(merged_all) == len(node["oneOf"]) else None
                if kept is None:
                    self.check(path, "oneOf")  # exactly one: the verifier checks what the anyOf cannot
                else:
                    merged_all = [merged_all[i] for i in kept]
            out = []
            for where, merged in merged_all:
                try:
                    out.append(self.walk(merged, where, refs))
                except _Unsat:
                    continue
            if not out:
                raise _Unsat(combined[0], path, "no branch can be satisfied")
            return out[0] if len(out) == 1 else {"anyOf": out}
        return self.walk_plain(node, path, refs)

    def walk_plain(self, node: dict, path: str, refs: tuple):
        types = _types(node)
        if "not" in node:
            self.check(path, "not")
        for k in ("if", "contains", "propertyNames", "dependentSchemas", "unevaluatedProperties",
                  "unevaluatedItems"):
            if k in node and not (k == "if" and "then" not in node and "else" not in node):
                self.check(path, k)
        if node.get("uniqueItems") is True:
            self._unique_items(node, path, refs)
        if "const" in node or "enum" in node:
            values = [node["const"]] if "const" in node else node["enum"]
            # only the listed values the keywords beside them allow (checked by jsonschema itself): exact
            cls = jsonschema.validators.validator_for(self.root if isinstance(self.root, dict) else {},
                                                      default=jsonschema.Draft202012Validator)
            check = cls({k: v for k, v in node.items() if k not in ("const", "enum")},
                        format_checker=jsonschema.FormatChecker())
            try:
                keep = [v for v in values if check.is_valid(v)]
            except Exception:  # noqa: BLE001 - a keyword jsonschema cannot evaluate out of context: verify
                keep = values
                self.check(path, "enum")
            if not keep:
                raise _Unsat("enum" if "enum" in node else "const", path, "no listed value satisfies the "
                             "keywords beside it")
            return {"enum": keep} if len(keep) > 1 else {"const": keep[0]}
        if "format" in node:
            fmt = node.pop("format")
            if fmt in FORMATS and (types is None or "string" in types):
                if "pattern" in node:
                    self.check(path, "format")  # both: the pattern is compiled, the format verified
                else:
                    node["pattern"] = FORMATS[fmt]
                    node["type"] = "string"
                    types = ["string"]
                    for k in ("minLength", "maxLength"):
                        if k in node:
                            self.check(path, k)
                            node.pop(k)
        if "pattern" in node:
            lengths = node.pop("minLength", None), node.pop("maxLength", None)
            folded = None
            if lengths != (None, None):
                try:
                    folded = _pattern_with_length(node["pattern"], lengths[0] or 0, lengths[1], path)
                except re.error:
                    folded = None
            if folded is not None:
                node["pattern"] = folded  # already a regex of JSON text: not re-emitted below
                node["$dgemmaEmitted"] = True
            else:
                for k, v in zip(("minLength", "maxLength"), lengths):
                    if v is not None:
                        self.check(path, k)  # outlines-core would keep only the lengths: the verifier holds them
            if not node.pop("$dgemmaEmitted", False):
                node["pattern"] = _safe_pattern(node["pattern"], path)
        if node.get("maxLength", 0) > LENGTH_CAP and node.get("minLength", 0) <= LENGTH_CAP:
            node["maxLength"] = LENGTH_CAP
        if node.get("maxItems", 0) > ITEMS_CAP and node.get("minItems", 0) <= ITEMS_CAP:
            node["maxItems"] = ITEMS_CAP
        if (types is None or "object" in types) and any(k in node for k in (
                "properties", "required", "additionalProperties", "patternProperties", "minProperties",
                "maxProperties", "dependentRequired", "dependencies")):
            self._object(node, path, refs)
        if (types is None or "array" in types) and any(k in node for k in (
                "items", "prefixItems", "minItems", "maxItems", "additionalItems")):
            self._array(node, path, refs)
        if types and "object" in types and "properties" not in node and "additionalProperties" not in node:
            node["additionalProperties"] = copy.deepcopy(FLAT)
        if types and "array" in types and "items" not in node and "prefixItems" not in node:
            node["items"] = copy.deepcopy(FLAT)
        for k in ("minLength", "maxLength", "minItems", "maxItems"):
            if k in node and k.startswith("min") and node.get("max" + k[3:], math.inf) < node[k]:
                raise _Unsat(k, path, f"{k} {node[k]} is above max{k[3:]} {node['max' + k[3:]]}")
        out = {k: v for k, v in node.items() if k in OUTLINES or k in BOUNDS or k == "multipleOf"}
        if types is not None:  # keywords of other types constrain nothing here (outlines-core would obey them)
            for kind, keys in _TYPE_KEYWORDS.items():
                if kind not in types and not (kind == "number" and "integer" in types):
                    for k in keys:
                        out.pop(k, None)
        if MEMBERS_KEY in node and types == ["object"]:
            return self.mark(self.members_regex(out["additionalProperties"], *node[MEMBERS_KEY]), path)
        if types is None:
            kinds = [t for t, keys in (("object", ("properties", "additionalProperties", "required")),
                                       ("array", ("items", "prefixItems")),
                                       ("string", ("pattern", "minLength", "maxLength")),
                                       ("number", BOUNDS + ("multipleOf",)))
                     if any(k in out for k in keys)]
            if not kinds:
                return copy.deepcopy(FLAT)  # only keywords that hold no value down (and verified ones)
            out["type"] = kinds[0]  # keywords of several types without 'type': values of the first (a subset)
            for kind in kinds[1:]:
                for k in _TYPE_KEYWORDS[kind]:
                    out.pop(k, None)
        kinds = [out["type"]] if isinstance(out.get("type"), str) else list(out.get("type") or [])
        if "object" in kinds and isinstance(out.get("properties"), dict):
            obj = self.mark(self.object_regex(out), path)
            rest = [t for t in kinds if t != "object"]
            if not rest:
                return obj
            other = {k: v for k, v in out.items() if k not in _TYPE_KEYWORDS["object"]}
            other["type"] = rest if len(rest) > 1 else rest[0]
            return {"anyOf": [obj, self._numeric(other, path)]}
        return self._numeric(out, path)

    def object_regex(self, node: dict) -> str:
        """An object with listed properties only: the required ones in the schema's order, then each optional one
        or not (when none is required: {} or the first property then any of the others, a subset). Linear in the
        number of
        properties (outlines-core's form, any optional property first, is quadratic, and nested objects
        multiplied it: megabytes of regex for real-world schemas)."""
        props, required = node["properties"], [n for n in node.get("required", []) if n in node["properties"]]
        order = required + [n for n in props if n not in required]
        if not order:
            return rf"\{{{WHITESPACE}\}}"
        head_optional = not required
        if head_optional:  # {} or the first property followed by any of the others (a subset, still linear)
            required = order[:1]

        def member(name: str) -> str:
            value = build_regex_from_schema(json.dumps(props[name]), WHITESPACE)
            return f"{re.escape(json.dumps(name))}{WHITESPACE}:{WHITESPACE}(?:{value})"

        sep = f"{WHITESPACE},{WHITESPACE}"
        body = sep.join(member(n) for n in required)
        body += "".join(f"(?:{sep}{member(n)})?" for n in order if n not in required)
        if head_optional:
            body = f"(?:{body})?"
        return rf"\{{{WHITESPACE}{body}{WHITESPACE}\}}"

    def negation(self, cond, base: dict, path: str, refs: tuple):
        """A schema of the values `cond` rejects, for conditions on listed properties' values (const / enum,
        the usual discriminator) and on required names; None for other conditions."""
        cond, _ = self.expand(cond, path + "/if", refs)
        if not isinstance(cond, dict) or set(cond) - {"properties", "required", "type", *ANNOTATIONS}:
            return None
        alts = []
        for name, sub in (cond.get("properties") or {}).items():
            sub, _ = self.expand(sub, f"{path}/if/properties/{name}", refs)
            if not isinstance(sub, dict) or set(sub) - {"const", "enum", *ANNOTATIONS} or not sub:
                return None
            banned = {json.dumps(v, sort_keys=True) for v in ([sub["const"]] if "const" in sub else sub["enum"])}
            own, _ = self.expand((base.get("properties") or {}).get(name, {}), f"{path}/properties/{name}", refs)
            if isinstance(own, dict) and ("enum" in own or "const" in own):
                values = [own["const"]] if "const" in own else own["enum"]
            elif isinstance(own, dict) and own.get("type") == "boolean":
                values = [True, False]
            else:
                return None
            rest = [v for v in values if json.dumps(v, sort_keys=True) not in banned]
            if rest:
                alts.append({"required": [name], "properties": {name: {"enum": rest}}})
        for name in cond.get("required") or []:
            alts.append({"properties": {name: False}})  # the name is absent
        if "type" in cond:
            return None
        if not alts:
            return False
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def members_regex(self, value, lo: int, hi: int | None) -> str:
        """An object of lo..hi members with names of at most 20 characters and values of schema `value`."""
        val = build_regex_from_schema(json.dumps(value), WHITESPACE)
        key = r'"(?:[^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt]){1,20}"'
        member = f"{key}{WHITESPACE}:{WHITESPACE}(?:{val})"
        more = f"(?:{WHITESPACE},{WHITESPACE}{member})"
        body = f"{member}{more}{{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
        if hi == 0:
            return rf"\{{{WHITESPACE}\}}"
        return rf"\{{{WHITESPACE}{body}{WHITESPACE}\}}" if lo > 0 else \
            rf"\{{{WHITESPACE}(?:{body})?{WHITESPACE}\}}"

    def _unique_items(self, node: dict, path: str, refs: tuple) -> None:
        """uniqueItems: verified; refused when the items can take fewer distinct values than minItems."""
        items = node.get("items")
        items, _ = self.expand(items, path + "/items", refs) if isinstance(items, dict) else (items, refs)
        n = None
        if isinstance(items, dict):
            if "enum" in items:
                n = len(items["enum"])
            elif "const" in items:
                n = 1
            elif items.get("type") == "boolean":
                n = 2
            elif items.get("type") == "null":
                n = 1
        if n is not None and node.get("minItems", 0) > n:
            raise _Unsat("uniqueItems", path, f"minItems {node['minItems']} unique items of {n} possible values")
        if node.get("maxItems", 2) > 1:
            self.check(path, "uniqueItems")

    def _object(self, node: dict, path: str, refs: tuple) -> None:
        props = dict(node.get("properties") or {})
        required = list(dict.fromkeys(node.get("required") or []))
        extra = node.get("additionalProperties", True)
        patterns = node.pop("patternProperties", None) or {}
        # dependencies (array form) / dependentRequired: a required trigger makes its dependents required; an
        # optional trigger with listed dependents makes them required too (a subset); else the verifier holds it
        deps = dict(node.pop("dependentRequired", None) or {})
        schema_deps = dict(node.pop("dependentSchemas", None) or {})
        for k, v in (node.pop("dependencies", None) or {}).items():
            (deps if isinstance(v, list) else schema_deps)[k] = v
        for trigger, needed in deps.items():
            if trigger in required or all(n in props for n in needed):
                if trigger in props or trigger in required:
                    required.extend(n for n in needed if n not in required)
            else:
                self.check(path, "dependentRequired")
        for trigger in schema_deps:
            if trigger not in required and trigger in props:
                props.pop(trigger)  # never written: the dependent schema never applies (a subset)
            elif trigger in required or extra is not False:
                self.check(path, "dependentSchemas")
        # required names the properties do not list: their schema from patternProperties / additionalProperties
        for name in required:
            if name in props:
                continue
            matching = [s for p, s in patterns.items() if _search(p, name, path)]
            if matching:
                props[name] = matching[0] if len(matching) == 1 else {"allOf": matching}
            elif extra is False:
                raise _Unsat("required", path, f"{name!r} is required but not allowed (additionalProperties false)")
            else:
                props[name] = extra if isinstance(extra, dict) else {}
        if patterns:
            for name in list(props):
                extra_parts = [s for p, s in patterns.items() if _search(p, name, path)]
                if extra_parts:
                    props[name] = {"allOf": [props[name], *extra_parts]}
        mn, mx = node.pop("minProperties", 0), node.pop("maxProperties", None)
        if len(required) < mn:
            for name in props:
                if len(required) >= mn:
                    break
                if name not in required:
                    required.append(name)
            if len(required) < mn:
                if extra is False:
                    raise _Unsat("minProperties", path, f"minProperties {mn} but only {len(required)} properties "
                                 f"are allowed")
                if node.get("properties") is not None or patterns:
                    raise _refuse("minProperties", path, f"{mn} above the {len(required)} listed properties is not "
                                  f"supported (only listed properties are written); list more properties")
                if mn > 1:
                    self.check(path, "minProperties")  # two equal names would count once: the verifier sees it
        if mx is not None and len(required) > mx:
            raise _Unsat("maxProperties", path, f"maxProperties {mx} but {len(required)} properties are required")
        if mx is not None and len(props) > mx:
            # only the required properties and the first optional ones up to mx are ever written (a subset)
            room = mx - len(required)
            optional = [n for n in props if n not in required]
            props = {n: v for n, v in props.items() if n in required or n in optional[:room]}
        if not props and extra is not False and (mn or mx is not None):
            node[MEMBERS_KEY] = (mn, mx)  # a free object with a member count: its own regex (walk_plain)
        walked = {}
        for name, s in props.items():
            try:
                walked[name] = self.walk(s, f"{path}/properties/{name}", refs)
            except _Unsat:
                if name in required:
                    raise
                continue  # an optional property no value satisfies is never written
        node.pop("dependentRequired", None)
        if walked or node.get("properties") is not None or patterns:
            node["properties"] = walked
            # listed properties only (outlines-core writes no others): a subset of what additional ones allow
            node["additionalProperties"] = False
        elif isinstance(extra, dict):
            try:
                node["additionalProperties"] = self.walk(extra, f"{path}/additionalProperties", refs)
            except _Unsat:
                node["additionalProperties"] = False
        elif extra is False:
            node["additionalProperties"] = False
        else:
            node["additionalProperties"] = copy.deepcopy(FLAT)
        if required:
            node["required"] = [n for n in required if n in walked]
        else:
            node.pop("required", None)

    def _array(self, node: dict, path: str, refs: tuple) -> None:
        items, extra = node.get("items"), node.pop("additionalItems", True)
        prefix = node.get("prefixItems")
        if isinstance(items, list):  # Draft 4-2019 tuple form
            prefix, items = items, extra
        mn, mx = node.get("minItems", 0), node.get("maxItems")
        if prefix is not None:
            if mx is not None:
                prefix = prefix[:mx]
            walked = []
            for i, s in enumerate(prefix):
                try:
                    walked.append(self.walk(s, f"{path}/prefixItems/{i}", refs))
                except _Unsat:
                    if i < mn:
                        raise
                    break  # the array stops before an item no value satisfies
            node["prefixItems"] = walked
            if len(walked) < len(prefix) or len(walked) >= mn:
                items = False  # exactly the prefix (outlines-core writes all of it): a subset
            elif items is None:
                items = True
        if items is False:
            node["items"] = False
        elif items is not None:
            try:
                node["items"] = self.walk(items, f"{path}/items", refs)
            except _Unsat:
                if mn > len(node.get("prefixItems", [])):
                    raise
                node["items"] = False
        if node.get("items") is False and not node.get("prefixItems"):
            node.pop("items")
            node["maxItems"] = 0
            node.pop("minItems", None)

    def _numeric(self, node: dict, path: str):
        """Bounded or multipleOf integer / number schemas become const markers whose text is replaced by their
        regex after compiling."""
        names = _types(node) or []
        numeric = [t for t in names if t in ("integer", "number")]
        if not numeric or "enum" in node or "const" in node or not any(k in node for k in (*BOUNDS, "multipleOf")):
            for k in (*BOUNDS, "multipleOf"):
                node.pop(k, None)
            return node
        integer = "number" not in numeric
        if "multipleOf" in node:
            rx = _multiples(node, integer, path)
        else:
            rx = number_range(node, integer=integer)
            if rx is None:
                raise _Unsat("minimum", path, f"no {numeric[0]} satisfies the bounds "
                             f"{ {k: node[k] for k in BOUNDS if k in node} }")
        rest = [t for t in names if t not in numeric]
        if not rest:
            return self.mark(rx, path)
        other = {k: v for k, v in node.items() if k not in (*BOUNDS, "multipleOf")}
        other["type"] = rest if len(rest) > 1 else rest[0]
        return {"anyOf": [self.mark(rx, path), other]}


def compile_schema(schema_text: str, limits: CompileLimits | None = None) -> CompiledSchema:
    """The regex of a canonical schema's JSON instances (compact: at most one space between tokens) and the
    keywords the verifier holds. Raises ConstraintError naming keyword and path for what is refused."""
    limits = limits or CompileLimits()
    root = json.loads(schema_text)
    c = _Compiler(root, limits)
    try:
        schema = c.walk(root, "")
    except _Unsat as e:
        raise _refuse(e.keyword, e.path, f"makes the schema unsatisfiable: {e.why}") from None
    except RecursionError:
        raise ConstraintError("json_schema is nested too deeply to compile") from None
    text = json.dumps(schema)
    try:
        regex = build_regex_from_schema(text, WHITESPACE)
    except BaseException as e:  # outlines-core raises ValueError / TypeError, a Rust panic as BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConstraintError(f"json_schema cannot be compiled: {e}") from None
    for mark, rx in reversed(c.marks.items()):  # outer marks first: their regexes hold earlier (inner) marks
        regex = regex.replace(f'"{mark}"', f"(?:{rx})")
    if len(regex) > limits.regex_chars:
        raise ConstraintError(f"json_schema compiles to a regex of {len(regex)} characters (limit "
                              f"{limits.regex_chars}); the largest part is at {c.largest()}")
    return CompiledSchema(regex, c.checks, c.largest())


def schema_regex(schema_text: str, limits: CompileLimits | None = None) -> str:
    """The regex of a schema whose every keyword the regex holds (template holes, which have no verifier)."""
    compiled = compile_schema(schema_text, limits)
    if compiled.checks:
        path, keyword = compiled.checks[0]
        raise _refuse(keyword, path, "is held by the output verifier, which template holes do not have")
    return compiled.regex
