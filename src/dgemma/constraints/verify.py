"""The JSON-schema verifier: what the automaton does not hold (uniqueItems, not, if/then/else, overlapping oneOf,
...) is checked on the decoded output, and the byte spans that break it are handed back so the sampler can steer
the canvas off them (re-noise, and re-run the DP without the offending classes).

The output so far (committed text + the current canvas) is a prefix of a JSON value. It is scanned into a tree of
values, each with its byte span and whether it is finished; the finished part is validated with `jsonschema`
(format checking on) against the original schema. An error counts when it is about a finished value (its
subschema is then settled: a finished value never changes), or when it can only get worse as the value grows
(`uniqueItems`, `maxItems`, `maxProperties`, `additionalProperties`, `propertyNames` on an unfinished container).
A complete output (EOS in the canvas) must validate in full.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass, field

import jsonschema

# errors that only grow as an unfinished container gets more members
MONOTONE = ("uniqueItems", "maxItems", "maxProperties", "additionalProperties", "propertyNames", "maxContains",
            "unevaluatedProperties", "unevaluatedItems", "maxLength")
# errors a finished container shows at its end (something is missing): the closing bracket is the offending span
AT_CLOSE = ("required", "minProperties", "minItems", "contains", "minContains", "dependentRequired",
            "dependencies")
_WS = b" \t\n\r"
MEMO = 8  # answers kept per schema (SchemaCheck.offending)
_SCALAR_END = b",}] \t\n\r"


@dataclass
class Value:
    start: int
    end: int  # one past the last byte (the scan's end when unfinished)
    done: bool
    value: object = None  # a container holds its finished members (and an unfinished container's, partly)
    members: list[tuple[object, int, Value]] = field(default_factory=list)  # (key or index, member start, value)

    def at(self, path) -> Value | None:
        v = self
        for p in path:
            for k, _, child in v.members:
                if k == p:
                    v = child
                    break
            else:
                return None
        return v


class _Scan:
    def __init__(self, data: bytes, complete: bool):
        self.b, self.n = data, len(data)
        self.complete = complete  # nothing follows: a number at the very end is finished

    def ws(self, i: int) -> int:
        while i < self.n and self.b[i] in _WS:
            i += 1
        return i

    def value(self, i: int) -> tuple[Value | None, int]:
        i = self.ws(i)
        if i >= self.n:
            return None, i
        c = self.b[i:i + 1]
        if c == b"{":
            return self.container(i, b"}", True)
        if c == b"[":
            return self.container(i, b"]", False)
        if c == b'"':
            j = self.string_end(i)
            if j is None:  # unfinished: the text so far, for maxLength (a string only grows)
                return Value(i, self.n, False, _partial_string(self.b[i:])), self.n
            return Value(i, j, True, json.loads(self.b[i:j])), j
        j = i
        while j < self.n and self.b[j] not in _SCALAR_END:
            j += 1
        if j >= self.n and not self.complete:
            return Value(i, self.n, False), self.n  # a number may go on
        try:
            return Value(i, j, True, json.loads(self.b[i:j])), j
        except ValueError:
            return Value(i, j, False), j

    def string_end(self, i: int) -> int | None:
        j = i + 1
        while j < self.n:
            c = self.b[j]
            if c == 0x5C:  # backslash
                j += 2
                continue
            if c == 0x22:
                return j + 1
            j += 1
        return None

    def container(self, i: int, close: bytes, is_object: bool) -> tuple[Value, int]:
        v = Value(i, self.n, False, {} if is_object else [])
        j = self.ws(i + 1)
        if self.b[j:j + 1] == close:
            v.end, v.done = j + 1, True
            return v, j + 1
        index = 0
        while True:
            j = self.ws(j)
            member_start = j
            if is_object:
                if self.b[j:j + 1] != b'"':
                    return v, self.n
                k = self.string_end(j)
                if k is None:
                    return v, self.n
                key = json.loads(self.b[j:k])
                j = self.ws(k)
                if self.b[j:j + 1] != b":":
                    return v, self.n
                j += 1
            else:
                key = index
            child, j = self.value(j)
            if child is None:
                return v, self.n
            v.members.append((key, member_start, child))
            if not child.done:
                if isinstance(child.value, (dict, list, str)):  # unfinished: what is there so far
                    if is_object:
                        v.value[key] = child.value
                    else:
                        v.value.append(child.value)
                return v, self.n
            if is_object:
                v.value[key] = child.value
            else:
                v.value.append(child.value)
            index += 1
            j = self.ws(j)
            c = self.b[j:j + 1]
            if c == b",":
                j += 1
            elif c == close:
                v.end, v.done = j + 1, True
                return v, j + 1
            else:
                return v, self.n


def _partial_string(text: bytes) -> str | None:
    """The characters of an unfinished JSON string so far (a trailing partial escape or UTF-8 sequence left out)."""
    for cut in range(len(text), max(len(text) - 8, 0), -1):
        try:
            return json.loads(text[:cut] + b'"')
        except ValueError:
            continue
    return None


def scan(data: bytes, complete: bool = False) -> Value | None:
    """The JSON value `data` begins (None when it holds nothing yet); `complete`: nothing follows `data`."""
    return _Scan(data, complete).value(0)[0]


def _key(x) -> str:
    return json.dumps(x, sort_keys=True)


def _span(err, node: Value) -> tuple[int, int]:
    """The bytes to steer off for one error about `node`."""
    kind = err.validator
    if kind == "uniqueItems":
        seen = set()
        for _, start, child in node.members:
            if child.done:
                k = _key(child.value)
                if k in seen:
                    return start, child.end  # the later duplicate
                seen.add(k)
    if kind in ("maxItems", "maxProperties", "additionalProperties", "propertyNames", "unevaluatedProperties") \
            and node.members:
        _, start, child = node.members[-1]
        return start, child.end
    if kind in AT_CLOSE and node.done and node.members is not None and isinstance(node.value, (dict, list)):
        return node.end - 1, node.end
    return node.start, node.end


@dataclass
class SchemaCheck:
    """The verifier of one JSON schema: `offending(data, complete)` -> byte spans of `data` that break it."""

    schema: object
    keywords: tuple[tuple[str, str], ...]  # (path, keyword) held here, not by the automaton (empty: final check)

    def __post_init__(self):
        cls = jsonschema.validators.validator_for(self.schema if isinstance(self.schema, dict) else {},
                                                  default=jsonschema.Draft202012Validator)
        self.validator = cls(self.schema, format_checker=jsonschema.FormatChecker())
        # the last few answers by (output, complete): a canvas that did not change since the last step (late
        # denoising steps, the sampled and the argmax canvas agreeing) is not scanned and validated again
        self.memo: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()  # one automaton (and its check) serves every request that asks for it

    @property
    def prefixes(self) -> bool:
        """Whether unfinished outputs are checked too (only when the automaton leaves keywords to the verifier)."""
        return bool(self.keywords)

    def offending(self, data: bytes, complete: bool) -> list[tuple[int, int]] | None:
        """Byte spans of `data` (the output so far; `complete`: EOS follows it) that break the schema; [] when
        nothing does yet; None when a complete output is not one JSON value (the automaton prevents it). A
        finished top-level value is validated in full; an unfinished one only where `prefixes`."""
        key = (bytes(data), complete)
        with self.lock:
            if key in self.memo:
                self.memo.move_to_end(key)
                spans = self.memo[key]
                return None if spans is None else list(spans)
        spans = self._offending(key[0], complete)
        with self.lock:
            self.memo[key] = None if spans is None else tuple(spans)
            while len(self.memo) > MEMO:
                self.memo.popitem(last=False)
        return spans

    def _offending(self, data: bytes, complete: bool) -> list[tuple[int, int]] | None:
        root = scan(data, complete)
        if root is None:
            return None if complete else []
        if complete and not root.done:
            return None
        if not root.done and not self.prefixes:
            return []
        spans = []
        for err in self.validator.iter_errors(root.value):
            node = root.at(err.absolute_path)
            if node is None:
                node = root
            if root.done or node.done or err.validator in MONOTONE:
                spans.append(_span(err, node))
        if not spans and not root.done and not complete and isinstance(root.value, (dict, list)) and \
                data[-1:] not in b'",]} ':
            # the last scalar may be whole already (a one-digit enum value before the canvas ends): if taking
            # it as finished breaks a rule that only gets worse, reject it now, while it is still in this canvas
            early = scan(data, True)
            for err in self.validator.iter_errors(early.value):
                node = early.at(err.absolute_path)
                if err.validator in MONOTONE and node is not None:
                    spans.append(_span(err, node))
        return spans
