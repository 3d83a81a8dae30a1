"""Infill templates: fixed text with holes to fill, e.g. `Name: {{hole:2-12}}, age: {{hole:1-3:[0-9]+}}.`

A hole holds between `min_tokens` and `max_tokens` tokens (equal: a fixed length; `max_tokens` None: unbounded) of
any text, or of text matching `regex` / `json_schema`. Fixed text keeps the tokenization the tokenizer gives it and
is clamped on the canvas every step (never re-noised), so holes are denoised with both sides in view.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConstraintError

_LENGTH = re.compile(r"(?::(\d+)(?:-(\d*))?)?")  # after "{{hole": ":N", ":MIN-MAX", ":MIN-" or nothing
MAX_HOLE = 4096  # tokens a bounded hole may hold


@dataclass(frozen=True)
class Hole:
    min_tokens: int = 1
    max_tokens: int | None = None  # None: no bound beyond max_tokens of the request
    regex: str | None = None
    json_schema: str | None = None  # canonical JSON text of a schema

    def __post_init__(self):
        if self.min_tokens < 0 or (self.max_tokens is not None and self.max_tokens < self.min_tokens):
            raise ConstraintError(f"hole length {self.min_tokens}-{self.max_tokens}: need 0 <= min <= max")
        if self.max_tokens is not None and self.max_tokens > MAX_HOLE:
            raise ConstraintError(f"hole of up to {self.max_tokens} tokens; the limit is {MAX_HOLE}")
        if self.regex is not None and self.json_schema is not None:
            raise ConstraintError("a hole takes a regex or a json_schema, not both")


@dataclass(frozen=True)
class Template:
    parts: tuple[str | Hole, ...]

    def __post_init__(self):
        if not any(isinstance(p, Hole) for p in self.parts):
            raise ConstraintError("the template has no hole ({{hole}}, {{hole:N}} or {{hole:MIN-MAX}})")

    @classmethod
    def parse(cls, text: str) -> Template:
        """`{{hole}}` (1+ tokens), `{{hole:N}}` (exactly N), `{{hole:MIN-MAX}}`, `{{hole:MIN-}}` (MIN or more), and
        an optional `:REGEX` after the length: `{{hole:1-3:[0-9]+}}` (a regex ends at the first `}}` outside its
        own braces)."""
        parts: list[str | Hole] = []
        at = 0
        while (start := text.find("{{hole", at)) >= 0:
            m = _LENGTH.match(text, start + 6)
            i = m.end()
            rx = None
            if text.startswith(":", i):  # a regex: up to the first }} at brace depth 0
                j, depth = i + 1, 0
                while j < len(text) and not (depth == 0 and text.startswith("}}", j)):
                    ch = text[j]
                    depth += (ch == "{") - (ch == "}")
                    j += 2 if ch == "\\" else 1
                rx, i = text[i + 1:j], j
            if not text.startswith("}}", i):
                raise ConstraintError(f"template: unclosed or malformed hole at character {start}")
            if start > at:
                parts.append(text[at:start])
            lo, hi = m.group(1), m.group(2)
            if lo is None:
                parts.append(Hole(1, None, rx or None))
            else:
                parts.append(Hole(int(lo), int(lo) if hi is None else (int(hi) if hi else None), rx or None))
            at = i + 2
        if at < len(text):
            parts.append(text[at:])
        return cls(tuple(parts))

    @classmethod
    def from_parts(cls, parts: list[Any]) -> Template:
        """A list of strings (fixed text) and hole objects {"min_tokens", "max_tokens", "regex", "json_schema"}
        ({"tokens": N} for a fixed length)."""
        if not isinstance(parts, list) or not parts:
            raise ConstraintError("template parts must be a non-empty list of strings and hole objects")
        out: list[str | Hole] = []
        for i, p in enumerate(parts):
            if isinstance(p, str):
                out.append(p)
                continue
            if not isinstance(p, dict):
                raise ConstraintError(f"template part {i} must be a string or a hole object, got {type(p).__name__}")
            unknown = set(p) - {"tokens", "min_tokens", "max_tokens", "regex", "json_schema"}
            if unknown:
                raise ConstraintError(f"template part {i}: unknown field(s) {sorted(unknown)}")
            n = p.get("tokens")
            lo = p.get("min_tokens", n if n is not None else 1)
            hi = p.get("max_tokens", n)
            for name, v in (("tokens", n), ("min_tokens", lo), ("max_tokens", hi)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise ConstraintError(f"template part {i}: {name} must be an integer")
            rx, schema = p.get("regex"), p.get("json_schema")
            if rx is not None and not isinstance(rx, str):
                raise ConstraintError(f"template part {i}: regex must be a string")
            if schema is not None:
                schema = json.dumps(schema) if not isinstance(schema, str) else schema
            out.append(Hole(lo, hi, rx, schema))
        return cls(tuple(out))

    def to_json(self) -> str:
        return json.dumps([p if isinstance(p, str) else {"min_tokens": p.min_tokens, "max_tokens": p.max_tokens,
                                                         "regex": p.regex, "json_schema": p.json_schema}
                           for p in self.parts], sort_keys=True)
