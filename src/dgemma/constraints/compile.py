"""Constraints (regex, JSON schema, choice list, infill template) -> `TokenAutomaton` over a model's vocabulary.

Regexes go through outlines-core, whose `Index` (Rust) walks every token's bytes through the regex's DFA; JSON
schemas become a regex (schema.py); a choice list is
an alternation of escaped literals; templates are built here from fixed token runs and holes. Compiled automata are
cached per (constraint, tokenizer, vocabulary size, EOS ids, pad id).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from outlines_core import Index

from .automaton import INF, TokenAutomaton
from .errors import ConstraintError
from .schema import CompileLimits, canonical, compile_schema, schema_regex
from .template import Template
from .verify import SchemaCheck
from .vocab import SENTINEL, TokenTable, outlines_vocabulary, sentinel_id, token_table

KINDS = ("regex", "json", "choice", "template")
_META = set("\\.+*?()|[]{}^$")


def escape(text: str) -> str:
    """A regex matching exactly `text` (escapes only metacharacters, which both Python and Rust regexes accept)."""
    return "".join("\\" + ch if ch in _META else ch for ch in text)


@dataclass(frozen=True)
class Constraint:
    """What the output must be: `kind` is one of KINDS; `value` is its canonical text (the regex, the schema as
    JSON, the choices as a JSON list, the template as JSON)."""

    kind: str
    value: str
    template: Template | None = None
    # the compile limits it is compiled under wherever it travels (not part of what it is: equal constraints with
    # other limits share one cached automaton); None: compile_constraint's argument, else CompileLimits()
    limits: CompileLimits | None = field(default=None, compare=False, repr=False)

    def with_limits(self, limits: CompileLimits | None) -> Constraint:
        return self if limits is None else dataclasses.replace(self, limits=limits)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """The whole output must match `pattern` (a leading ^ and trailing $ are implied and may be written)."""
        if not isinstance(pattern, str):
            raise ConstraintError(f"regex must be a string, got {type(pattern).__name__}")
        if pattern.startswith("^"):
            pattern = pattern[1:]
        if pattern.endswith("$") and (len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))) % 2 == 0:
            pattern = pattern[:-1]  # an unescaped $: not preceded by an odd number of backslashes
        return cls("regex", pattern)

    @classmethod
    def json_schema(cls, schema) -> Constraint:
        return cls("json", canonical(schema))

    @classmethod
    def choice(cls, options) -> Constraint:
        if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options:
            raise ConstraintError("choice must be a non-empty list of strings")
        if not all(isinstance(o, str) for o in options):
            raise ConstraintError("every choice must be a string")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def infill(cls, template: Template | str | list) -> Constraint:
        if isinstance(template, str):
            template = Template.parse(template)
        elif isinstance(template, list):
            template = Template.from_parts(template)
        elif not isinstance(template, Template):
            raise ConstraintError("template must be a Template, a string with {{hole}} marks or a list of parts")
        return cls("template", template.to_json(), template)

    @classmethod
    def from_args(cls, regex=None, json_schema=None, choice=None, template=None) -> Constraint | None:
        """At most one of the keyword forms (a template's holes carry their own regex or schema)."""
        given = [(k, v) for k, v in (("regex", regex), ("json_schema", json_schema), ("choice", choice),
                                     ("template", template)) if v is not None]
        if len(given) > 1:
            raise ConstraintError("give one of regex, json_schema, choice, template "
                                  f"(got {', '.join(k for k, _ in given)}); "
                                  "a template's holes take their own regex or json_schema")
        if not given:
            return None
        kind, value = given[0]
        return {"regex": cls.regex, "json_schema": cls.json_schema, "choice": cls.choice,
                "template": cls.infill}[kind](value)

    def regex_text(self) -> str:
        if self.kind == "regex":
            return self.value
        if self.kind == "json":
            return schema_regex(self.value)
        if self.kind == "choice":
            return "(" + "|".join(escape(o) for o in json.loads(self.value)) + ")"
        raise ConstraintError("a template is not a regex")

    def describe(self) -> str:
        return {"regex": "regex", "json": "json_schema", "choice": "choice", "template": "template"}[self.kind]


# -- token-level edges --------------------------------------------------------------------------------------------
@dataclass
class Edges:
    src: np.ndarray
    tok: np.ndarray
    dst: np.ndarray
    n_states: int
    start: int
    finals: list[int]
    fixed: list[int] = field(default_factory=list)  # states entered by a template's fixed tokens


def _check_parentheses(regex: str, what: str) -> None:
    """Unescaped parentheses outside character classes must balance (the regex is wrapped in a group)."""
    depth, in_class, i = 0, 0, 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "[":
                in_class += 1
            elif ch == "]" and regex[i - 1] not in "[^":
                in_class -= 1
        elif ch == "[":
            in_class = 1
            if regex[i + 1:i + 2] == "]" or regex[i + 1:i + 3] == "^]":
                i += 2 if regex[i + 1] == "]" else 3  # a leading ] is a literal
                continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                break
        i += 1
    if depth != 0:
        raise ConstraintError(f"{what} {regex[:200]!r} cannot be compiled: unbalanced parentheses")


_ASCII = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]", "s": "[\\t\\n\\v\\f\\r ]",
          "S": "[^\\t\\n\\v\\f\\r ]"}


def ascii_classes(regex: str) -> str:
    """\\d, \\w, \\s (and their negations) as their ASCII classes. Rust's are Unicode-wide (\\d takes any script's
    digits, some newer than a given Python's tables); the ASCII classes are a subset of every reading, so the output
    matches whichever engine checks it. (Inside a class, [\\d.] becomes [[0-9].], a nested class.)"""
    out, i = [], 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            out.append(_ASCII.get(nxt, ch + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def regex_edges(regex: str, table: TokenTable, exclude: frozenset[int], what: str = "regex",
                limits: CompileLimits | None = None, where: str = "") -> Edges:
    """Token-level edges of `regex` (see `index_edges`), built within `limits`: in a forked child process where
    the platform has fork (killed past the time or memory limit), so a regex whose automaton explodes is refused
    (naming `where`, the part of the constraint that makes most of it) instead of exhausting memory."""
    limits = limits or CompileLimits()
    _check_parentheses(regex, what)
    outlines_vocabulary(table, exclude)  # built (and cached) here, not in the child
    if not hasattr(os, "fork"):
        return index_edges(regex, table, exclude, what, limits.states, where)
    return _bounded(index_edges, (regex, table, exclude, what, limits.states, where), limits,
                    f"{what} {regex[:80]!r}" if what in ("regex", "hole regex") else what, where)


def _rss_mb(pid: int) -> float:
    """Anonymous resident memory of a process in MB (Linux; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _die_with_parent(parent: int) -> None:
    """In the compile child: be killed when the process that waits for it ends (Linux), so a killed server or
    benchmark leaves no index build running on."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def _bounded(fn, args, limits: CompileLimits, what: str, where: str):
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    parent = os.getpid()

    def child():
        _die_with_parent(parent)
        try:
            result = ("ok", fn(*args))
        except ConstraintError as e:
            result = ("error", str(e))
        except BaseException as e:  # noqa: BLE001 - a Rust panic or MemoryError: reported, never raised here
            result = ("error", f"{what} cannot be compiled: {type(e).__name__}: {e}")
        send.send(result)

    base = _rss_mb(os.getpid())
    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send.close()
    deadline = time.monotonic() + limits.seconds
    part = f" (the largest part is at {where})" if where else ""
    try:
        while True:
            if recv.poll(0.02):
                kind, value = recv.recv()
                if kind == "error":
                    raise ConstraintError(value)
                return value
            if not proc.is_alive() and not recv.poll(0):
                raise ConstraintError(f"compiling the {what} failed (the compiler process ended with code "
                                      f"{proc.exitcode}){part}")
            if time.monotonic() > deadline:
                raise ConstraintError(f"the {what} took more than {limits.seconds:g} s to compile{part}; "
                                      f"simplify it there or raise {CompileLimits.raise_hint('seconds')}")
            if _rss_mb(proc.pid) - base > limits.memory_mb:
                raise ConstraintError(f"the {what} needs more than {limits.memory_mb:g} MB to compile{part}; "
                                      f"simplify it there or raise {CompileLimits.raise_hint('memory_mb')}")
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()


def index_edges(regex: str, table: TokenTable, exclude: frozenset[int], what: str = "regex",
                max_states: int | None = None, where: str = "") -> Edges:
    """Token-level edges of `regex` (the whole output must match) over the text tokens of `table`.

    outlines-core's Index follows leftmost-first match semantics: once a match is reached, lower-priority
    alternatives and tokens that run on past the match are cut (for `1|12|123` it allows only "1"). The regex is
    therefore compiled followed by SENTINEL (U+10FFFF), given a token of its own: nothing matches before the end,
    so every continuation is kept, and the accepting states are those whose SENTINEL edge reaches a match."""
    vocab = outlines_vocabulary(table, exclude)
    try:
        index = Index(f"(?:{ascii_classes(regex)}){SENTINEL}", vocab)
    except BaseException as e:  # outlines-core raises ValueError (and a Rust panic surfaces as BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConstraintError(f"{what} {regex[:200]!r} cannot be compiled: {e}") from None
    trans = index.get_transitions()
    if max_states is not None and len(trans) > max_states:
        raise ConstraintError(f"the {what} compiles to more than {max_states} automaton states ({len(trans)})"
                              + (f"; the largest part is at {where}" if where else "") +
                              f"; simplify it there or raise {CompileLimits.raise_hint('states')}")
    start = index.get_initial_state()
    eos, sentinel = len(table.pieces), sentinel_id(table)  # outlines' EOS id and the sentinel's (vocab.py)
    names = sorted(set(trans) | {start} | {d for row in trans.values() for d in row.values()})
    number = {s: i for i, s in enumerate(names)}
    src: list[int] = []
    tok: list[int] = []
    dst: list[int] = []
    finals = []
    accepting = set(index.get_final_states())
    for s, row in trans.items():
        if row.get(sentinel) in accepting:  # w SENTINEL matches iff w does (the regex may hold U+10FFFF itself)
            finals.append(number[s])
        row = {t: d for t, d in row.items() if t < eos}
        src.extend([number[s]] * len(row))
        tok.extend(row.keys())
        dst.extend(number[d] for d in row.values())
    return Edges(np.asarray(src, np.int64), np.asarray(tok, np.int64), np.asarray(dst, np.int64), len(names),
                 number[start], finals)


ANY_TEXT = r"[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*"  # a hole's default: UTF-8 text, no control characters


def _any_text(table: TokenTable, exclude: frozenset[int], limits: CompileLimits | None = None) -> Edges:
    return regex_edges(ANY_TEXT, table, exclude, "hole", limits)


class _Builder:
    """Grows an NFA segment by segment; `frontier` holds the states where the next segment starts."""

    def __init__(self):
        self.src: list[np.ndarray] = []
        self.tok: list[np.ndarray] = []
        self.dst: list[np.ndarray] = []
        self.n = 1
        self.frontier = [0]
        self.fixed: list[int] = []

    def add(self, s, t, d) -> None:
        self.src.append(np.asarray(s, np.int64))
        self.tok.append(np.asarray(t, np.int64))
        self.dst.append(np.asarray(d, np.int64))

    def fixed_token(self, t: int) -> None:
        new = self.n
        self.n += 1
        self.add(self.frontier, [t] * len(self.frontier), [new] * len(self.frontier))
        self.fixed.append(new)
        self.frontier = [new]

    def hole(self, sub: Edges, lo: int, hi: int | None) -> None:
        """`sub`'s language, lo..hi tokens long: states (sub state, tokens so far), counting up to hi (or to lo
        and then staying there when unbounded)."""
        cap = hi if hi is not None else lo
        ns, base = sub.n_states, self.n
        self.n += ns * (cap + 1)
        state = lambda q, k: base + k * ns + q  # noqa: E731
        for k in range(cap + 1):
            if hi is not None and k == hi:
                break
            k2 = min(k + 1, cap)
            s, d = state(sub.src, k), state(sub.dst, k2)
            self.add(s, sub.tok, d)
            if k == 0:  # entering the hole: the frontier states stand for (start, 0)
                first = sub.src == sub.start
                for f in self.frontier:
                    self.add(np.full(int(first.sum()), f), sub.tok[first], d[first])
        exits = [state(q, k) for q in sub.finals for k in range(lo, cap + 1)]
        if lo == 0 and sub.start in sub.finals:
            exits += self.frontier
        self.frontier = sorted(set(exits))

    def edges(self) -> Edges:
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        return Edges(cat(self.src), cat(self.tok), cat(self.dst), self.n, 0, list(self.frontier), self.fixed)


def template_edges(template: Template, tokenizer, table: TokenTable, exclude: frozenset[int],
                   limits: CompileLimits | None = None) -> Edges:
    b = _Builder()
    for part in template.parts:
        if isinstance(part, str):
            for t in tokenizer.encode(part):
                b.fixed_token(t)
            continue
        if part.regex is not None:
            sub = regex_edges(part.regex, table, exclude, "hole regex", limits)
        elif part.json_schema is not None:
            sub = regex_edges(schema_regex(canonical(part.json_schema), limits), table, exclude, "hole json_schema",
                              limits)
        else:
            sub = _any_text(table, exclude, limits)
        b.hole(sub, part.min_tokens, part.max_tokens)
    return b.edges()


# -- compile, cached ----------------------------------------------------------------------------------------------
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()
CACHE_SIZE = 32


def compile_constraint(constraint: Constraint, tokenizer, vocab_size: int, eos_ids, fill_id: int,
                       limits: CompileLimits | None = None) -> TokenAutomaton:
    """The token automaton of `constraint` for this tokenizer and vocabulary (cached). Raises ConstraintError for a
    malformed constraint, one that matches nothing the vocabulary can write, or one past `limits` (default: the
    constraint's own, else CompileLimits()). A constraint already in the cache is not compiled again."""
    limits = limits or constraint.limits or CompileLimits()
    if tokenizer is None:
        raise ConstraintError("constrained generation needs the model's tokenizer (tokenizer.json)")
    eos_ids = tuple(sorted(set(eos_ids)))
    if not eos_ids:
        raise ConstraintError("constrained generation needs an EOS token id (generation_config eos_token_id)")
    table = token_table(tokenizer, vocab_size)
    key = (constraint.kind, constraint.value, table.fingerprint, eos_ids, fill_id)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    exclude = frozenset(eos_ids) | {fill_id}
    check = None
    if constraint.kind == "template":
        e = template_edges(constraint.template, tokenizer, table, exclude, limits)
    elif constraint.kind == "json":
        compiled = compile_schema(constraint.value, limits)
        e = regex_edges(compiled.regex, table, exclude, constraint.describe(), limits, compiled.largest)
        # every JSON output is checked with jsonschema before it may end (the keywords the regex leaves to the
        # verifier, on every prefix too): an output that ends with EOS validates
        check = SchemaCheck(json.loads(constraint.value), tuple(compiled.checks))
    else:
        e = regex_edges(constraint.regex_text(), table, exclude, constraint.describe(), limits)
    aut = TokenAutomaton.build(e.src, e.tok, e.dst, e.n_states, e.start, e.finals, vocab_size, eos_ids, fill_id,
                               e.fixed)
    if aut.min_tokens >= INF:
        raise ConstraintError(f"the {constraint.describe()} matches no text that this model's vocabulary can write")
    if check is not None:
        aut.check, aut.pieces, aut.eos_ids = check, table.pieces, eos_ids
    with _lock:
        _cache[key] = aut
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return aut
