"""Regexes for bounded integers and numbers (JSON schema minimum / maximum), which outlines-core's schema compiler
ignores: without them a schema with `"minimum": 0` would admit -17."""

from __future__ import annotations

import math


def _same_length(x: str, y: str) -> str:
    """Digit strings of one length between x and y (x <= y), inclusive."""
    if not x:
        return ""
    if x[0] == y[0]:
        return x[0] + _group(_same_length(x[1:], y[1:]))
    rest = len(x) - 1
    if x[1:] == "0" * rest and y[1:] == "9" * rest:
        return f"[{x[0]}-{y[0]}]" + (f"[0-9]{{{rest}}}" if rest else "")
    parts = [x[0] + _group(_same_length(x[1:], "9" * rest))]
    lo, hi = int(x[0]) + 1, int(y[0]) - 1
    if lo <= hi:
        parts.append(f"[{lo}-{hi}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    parts.append(y[0] + _group(_same_length("0" * rest, y[1:])))
    return "|".join(parts)


def _group(rx: str) -> str:
    return f"(?:{rx})" if "|" in rx else rx


def natural_range(a: int, b: int | None) -> str | None:
    """Decimal numerals (no sign, no leading zeros) of a..b, b None for no upper bound; None when empty."""
    if b is not None and b < a:
        return None
    parts = []
    top = len(str(b)) if b is not None else len(str(a))
    for n in range(len(str(a)), top + 1):
        lo = max(a, 10 ** (n - 1) if n > 1 else 0)
        hi = min(b, 10 ** n - 1) if b is not None else 10 ** n - 1
        if lo <= hi:
            parts.append(_same_length(str(lo), str(hi)))
    if b is None:
        parts.append(f"[1-9][0-9]{{{len(str(a))},}}")
    return "|".join(_group(p) for p in parts)


def integer_range(lo: int | None, hi: int | None) -> str | None:
    """JSON integers in [lo, hi] (None: unbounded on that side); None when the range is empty."""
    parts = []
    if hi is None or hi >= 0:
        nat = natural_range(max(lo, 0) if lo is not None else 0, hi)
        if nat:
            parts.append(_group(nat))
    if lo is None or lo < 0:
        neg = natural_range(max(-hi, 1) if hi is not None else 1, -lo if lo is not None else None)
        if neg:
            parts.append("-" + _group(neg))
    return "|".join(parts) if parts else None


def bounds(schema: dict, integer: bool) -> tuple[int | None, int | None, int | None, int | None]:
    """(integers lo, hi; lo, hi for numbers with a fraction part n.xxx) from minimum / maximum /
    exclusiveMinimum / exclusiveMaximum. A fraction is allowed after integer n only where all of [n, n + 1) or
    (n - 1, n] (negative n) lies inside the bounds: a subset of the valid numbers, never an invalid one."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    ilo = math.ceil(lo) if lo is not None else None
    ihi = math.floor(hi) if hi is not None else None
    if xlo is not None and not isinstance(xlo, bool):
        v = math.floor(xlo) + 1
        ilo = v if ilo is None else max(ilo, v)
    if xhi is not None and not isinstance(xhi, bool):
        v = math.ceil(xhi) - 1
        ihi = v if ihi is None else min(ihi, v)
    return ilo, ihi, ilo, (ihi - 1 if ihi is not None else None)


def number_range(schema: dict, integer: bool) -> str | None:
    ilo, ihi, flo, fhi = bounds(schema, integer)
    whole = integer_range(ilo, ihi)
    if integer:
        return whole
    parts = [whole] if whole else []
    frac = r"\.[0-9]+"
    pos = natural_range(max(flo, 0) if flo is not None else 0, fhi) if fhi is None or fhi >= 0 else None
    if pos:  # n.xxx in [n, n + 1): needs n >= lo and n + 1 <= hi
        parts.append(f"(?:{pos}){frac}")
    # -k.xxx in (-(k + 1), -k]: needs -k <= hi and -(k + 1) >= lo, i.e. k >= -hi and k <= -lo - 1
    kmin = max(1, -ihi) if ihi is not None else 1
    kmax = (-ilo - 1) if ilo is not None else None
    neg = natural_range(kmin, kmax) if kmax is None or kmax >= kmin else None
    if neg:
        parts.append(f"-(?:{neg}){frac}")
    return "|".join(_group(p) for p in parts) if parts else None
