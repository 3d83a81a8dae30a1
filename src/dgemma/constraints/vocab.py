"""The byte string each token id stands for, read from tokenizer.json (byte-level BPE, SentencePiece-style with
byte fallback, plain), and the outlines-core `Vocabulary` built from it (cached per tokenizer)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import weakref
from dataclasses import dataclass

from outlines_core import Vocabulary

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SENTINEL = "\U0010FFFF"  # the last code point (a noncharacter): marks the end of a regex, see compile.regex_edges


@functools.cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in decoder.get("decoders", [])))
    kind = decoder["type"]
    if kind == "Replace" and decoder.get("content") == " " and decoder.get("pattern", {}).get("String") == "▁":
        return {"Metaspace"}
    return {kind}


@dataclass(frozen=True)
class TokenTable:
    """`pieces[i]`: the bytes token i decodes to, or None for special tokens and ids with no string (such ids are
    never generated under a constraint). `fingerprint` identifies the tokenizer for caches."""

    pieces: tuple[bytes | None, ...]
    fingerprint: str

    @property
    def text_ids(self) -> list[int]:
        return [i for i, p in enumerate(self.pieces) if p]


_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer, vocab_size: int) -> TokenTable:
    """Token bytes for ids [0, vocab_size) of a `dgemma.tokenizer.Tokenizer` (cached on the tokenizer object)."""
    key = vocab_size
    cached = _tables.get(tokenizer, {})
    if key in cached:
        return cached[key]
    spec_text = tokenizer.tok.to_str()
    spec = json.loads(spec_text)
    kinds = _decoder_kinds(spec.get("decoder"))
    model = spec.get("model", {})
    vocab = model.get("vocab", {})
    pairs = vocab.items() if isinstance(vocab, dict) else ((p[0], i) for i, p in enumerate(vocab))  # Unigram: list
    strings: dict[int, str] = {i: s for s, i in pairs}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        if not t.get("special"):
            strings[t["id"]] = t["content"]  # added text tokens decode to their content as written
    added = {t["id"] for t in spec.get("added_tokens", [])}
    byte_level = byte_level_decoder() if "ByteLevel" in kinds else None
    pieces: list[bytes | None] = [None] * vocab_size
    for i, s in strings.items():
        if not 0 <= i < vocab_size or i in special or not s:
            continue
        if i in added:
            pieces[i] = s.encode("utf-8")
        elif byte_level is not None:
            try:
                pieces[i] = bytes(byte_level[c] for c in s)
            except KeyError:  # not a byte-level string: leave it out rather than guess
                continue
        elif "ByteFallback" in kinds and (m := _BYTE_FALLBACK.match(s)):
            pieces[i] = bytes([int(m.group(1), 16)])
        else:
            if "Metaspace" in kinds:
                s = s.replace("▁", " ")
            pieces[i] = s.encode("utf-8")
    fp = hashlib.sha256(spec_text.encode()).hexdigest()[:16] + f":{vocab_size}"
    table = TokenTable(tuple(pieces), fp)
    cached[key] = table
    _tables[tokenizer] = cached
    return table


@functools.lru_cache(maxsize=8)
def _vocabulary(table: TokenTable, exclude: frozenset[int]) -> Vocabulary:
    by_piece: dict[bytes, list[int]] = {}
    for i, p in enumerate(table.pieces):
        if p and i not in exclude:
            by_piece.setdefault(p, []).append(i)
    # outlines-core wants an EOS id of its own, and compile.py appends SENTINEL to every regex: ids past the
    # vocabulary never collide with a real token
    by_piece.setdefault(SENTINEL.encode(), []).append(sentinel_id(table))
    return Vocabulary(len(table.pieces), by_piece)


def sentinel_id(table: TokenTable) -> int:
    return len(table.pieces) + 1


def outlines_vocabulary(table: TokenTable, exclude: frozenset[int]) -> Vocabulary:
    """The text tokens (less `exclude`: EOS and pad ids) as an outlines-core Vocabulary."""
    return _vocabulary(table, exclude)
