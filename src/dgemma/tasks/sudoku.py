"""Sudoku as a denoising task: puzzles and solutions are 81-digit canvases.

A grid is an 81-character string of ASCII digits in row-major order, `0` for an empty cell. Everything here is
pure Python (standard library only) and deterministic for a given seed.

- `parse_grid` / `format_grid`: read a grid (`0` or `.` for blanks; text after the first whitespace is ignored)
  with clear errors, and print one for humans.
- `solve` / `count_solutions` / `is_unique`: exact solver (bitmask constraint propagation with naked and hidden
  singles, then minimum-remaining-values backtracking over cells and unit/digit places); the hardest known puzzles
  take milliseconds.
- `generate` / `generate_many` / `dedupe`: puzzles with a unique solution and a requested number of blanks, and
  training / held-out splits that share no puzzle (or, with ``by="solution"``, no solution grid).
- `check`: score a model's answer (`valid`, `givens_kept`, `solved`, `cell_accuracy`); never raises on a
  malformed answer.
- `prompt_text` / `answer_text` / `parse_answer`: the fine-tuning text encoding (no chat-template tokens; the
  caller applies the template).
- `blank_count` / `bucket`: per-difficulty reporting.
- `write_jsonl` / `read_jsonl`: ``{"prompt", "response", "puzzle", "solution"}`` per line, written atomically.

Command line: ``python -m dgemma.tasks.sudoku --n 1000 --seed 0 --blanks 30 50 --out train.jsonl
[--exclude test.jsonl] [--by solution]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypedDict

__all__ = [
    "PROMPT", "CELLS", "MAX_BLANKS", "parse_grid", "format_grid", "solve", "count_solutions", "is_unique", "is_complete",
    "generate", "generate_many", "dedupe", "check", "CheckResult", "prompt_text", "task_info", "answer_text", "parse_answer",
    "blank_count", "bucket", "write_jsonl", "read_jsonl",
]

PROMPT = "Solve this sudoku. 0 marks an empty cell."
"""The instruction line of `prompt_text`; the cell names and then the puzzle follow on the next lines."""

CELLS = "".join(c for c in map(chr, range(33, 127)) if c not in "0123456789<>\\")
"""One distinct printable character per cell (row-major), written on its own line above the puzzle. A model without
absolute position embeddings can then learn each cell's row, column and box from a token instead of having to infer
them from relative positions: cell i of the puzzle and of the answer sit a fixed distance after its name."""
assert len(CELLS) == 81 and len(set(CELLS)) == 81

MAX_BLANKS = 64
"""No 9x9 puzzle with fewer than 17 givens has a unique solution, so at most 81 - 17 blanks."""

_DIGITS = frozenset("0123456789")
_ALL = 0x1FF  # bit d-1 set <=> digit d
_ROW = tuple(i // 9 for i in range(81))
_COL = tuple(i % 9 for i in range(81))
_BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
_UNITS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
    + tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
    + tuple(tuple(i for i in range(81) if _BOX[i] == b) for b in range(9))
)
_UNIT_NAMES = tuple(f"{kind} {k + 1}" for kind in ("row", "column", "box") for k in range(9))
_POP = tuple(bin(m).count("1") for m in range(512))
_BITS = tuple(tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512))
_BIT_CHAR = {1 << d: str(d + 1) for d in range(9)}
_BIT_CHAR[0] = "0"
_CHAR_BIT = {str(d + 1): 1 << d for d in range(9)}
_CHAR_BIT["0"] = 0


# --------------------------------------------------------------------------------------------------------------
# Representation


def parse_grid(text: str) -> str:
    """Return the canonical 81-digit form (`0` for blanks) of `text`.

    Accepts digits with `0` or `.` for blanks; leading whitespace is skipped and everything from the first
    whitespace after the grid on is ignored (so ``"<grid> # comment"`` and ``"<grid>\\n"`` are fine). Raises
    `ValueError` naming the problem: an empty input, a wrong length, a bad character (with its row and column), or a
    digit given twice in a row, column or box.
    """
    if not isinstance(text, str):
        raise ValueError(f"sudoku grid must be a string, got {type(text).__name__}")
    parts = text.split(maxsplit=1)
    if not parts:
        raise ValueError("empty sudoku grid: expected 81 cells")
    s = parts[0]
    if len(s) != 81:
        raise ValueError(f"sudoku grid must have 81 cells, got {len(s)}")
    s = s.replace(".", "0")
    for i, ch in enumerate(s):
        if ch not in _DIGITS:
            raise ValueError(f"invalid character {ch!r} at cell {i} (row {i // 9 + 1}, column {i % 9 + 1}); "
                             "expected a digit, or 0 or . for a blank")
    for name, unit in zip(_UNIT_NAMES, _UNITS):
        seen: dict[str, int] = {}
        for i in unit:
            ch = s[i]
            if ch == "0":
                continue
            if ch in seen:
                j = seen[ch]
                raise ValueError(f"duplicate digit {ch} in {name} (cells {j} and {i})")
            seen[ch] = i
    return s


def format_grid(s: str, *, rules: bool = False) -> str:
    """A human-readable grid: 9 lines such as ``5 3 . | . 7 . | . . .`` (blanks shown as `.`).

    With ``rules=True`` a ``------+-------+------`` line separates the bands (11 lines). `s` must be 81 characters
    (`0` or `.` for blanks) but is otherwise not validated, so a wrong answer can be shown too.
    """
    if len(s) != 81:
        raise ValueError(f"sudoku grid must have 81 cells, got {len(s)}")
    lines = []
    for r in range(9):
        cells = ["." if ch in "0." else ch for ch in s[r * 9:r * 9 + 9]]
        lines.append(" | ".join(" ".join(cells[k:k + 3]) for k in (0, 3, 6)))
        if rules and r in (2, 5):
            lines.append("------+-------+------")
    return "\n".join(lines)


def is_complete(s: str) -> bool:
    """True when `s` is 81 digits forming a full, correct grid: every row, column and box a permutation of 1-9."""
    if not isinstance(s, str) or len(s) != 81 or "0" in s or not set(s) <= _DIGITS:
        return False
    return all(len({s[i] for i in unit}) == 9 for unit in _UNITS)


# --------------------------------------------------------------------------------------------------------------
# Solver. State: `grid` is 81 bit masks (0 = empty, else the single bit of the digit); `rows`, `cols`, `boxes` hold
# the digits used in each unit. `_search` mutates its arguments, so callers pass copies.


def _masks(grid: list[int]) -> tuple[list[int], list[int], list[int]]:
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, bit in enumerate(grid):
        if bit:
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    return rows, cols, boxes


def _search(grid: list[int], rows: list[int], cols: list[int], boxes: list[int], out: list[str], limit: int,
            rng: random.Random | None) -> bool:
    """Append solutions of the state to `out`; True once `out` holds `limit` (stop searching)."""
    cand = [0] * 81
    while True:
        # Naked singles, dead ends, and the empty cell with the fewest candidates.
        best, best_n, progress = -1, 10, False
        for i in range(81):
            if grid[i]:
                continue
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            m = _ALL & ~(rows[r] | cols[c] | boxes[b])
            if not m:
                return False
            n = _POP[m]
            if n == 1:
                grid[i] = m
                rows[r] |= m
                cols[c] |= m
                boxes[b] |= m
                progress = True
            elif n < best_n:
                best, best_n = i, n
            cand[i] = m
        if progress:
            continue
        if best < 0:
            out.append("".join([_BIT_CHAR[bit] for bit in grid]))
            return len(out) >= limit
        # Hidden singles: a digit with exactly one possible cell in a unit. `cand` may be stale (a superset of the
        # truth) after placements in this pass, so each placement is re-checked against the unit masks. Also note a
        # digit with exactly two places in a unit (`bu`, `bd`): if every cell has 3+ candidates, branching there is
        # narrower (this removes the heavy tail on puzzles such as Norvig's "hard1").
        bu, bd, bn = -1, 0, best_n
        for u, unit in enumerate(_UNITS):
            once = twice = thrice = placed = 0
            for i in unit:
                bit = grid[i]
                if bit:
                    placed |= bit
                else:
                    m = cand[i]
                    thrice |= twice & m
                    twice |= once & m
                    once |= m
            if (once | placed) != _ALL:
                return False  # some digit has nowhere to go in this unit
            singles = once & ~twice & ~placed
            if not singles:
                if bn > 2 and not progress:
                    pairs = twice & ~thrice
                    if pairs:
                        bu, bd, bn = u, pairs & -pairs, 2
                continue
            for i in unit:
                if grid[i]:
                    continue
                bit = cand[i] & singles
                if not bit:
                    continue
                if bit & (bit - 1):
                    return False  # one cell is the only place for two digits
                r, c, b = _ROW[i], _COL[i], _BOX[i]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return False
                grid[i] = bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                progress = True
        if progress:
            continue
        if bu >= 0:  # branch on the two places of digit `bd` in unit `bu`
            cells = [i for i in _UNITS[bu] if not grid[i] and cand[i] & bd]
            if rng is not None:
                rng.shuffle(cells)
            for i in cells:
                r, c, b = _ROW[i], _COL[i], _BOX[i]
                g = grid[:]
                g[i] = bd
                rs, cs, bs = rows[:], cols[:], boxes[:]
                rs[r] |= bd
                cs[c] |= bd
                bs[b] |= bd
                if _search(g, rs, cs, bs, out, limit, rng):
                    return True
            return False
        # Otherwise branch on the cell with the fewest candidates.
        bits = list(_BITS[cand[best]])
        if rng is not None:
            rng.shuffle(bits)
        r, c, b = _ROW[best], _COL[best], _BOX[best]
        for bit in bits:
            g = grid[:]
            g[best] = bit
            rs, cs, bs = rows[:], cols[:], boxes[:]
            rs[r] |= bit
            cs[c] |= bit
            bs[b] |= bit
            if _search(g, rs, cs, bs, out, limit, rng):
                return True
        return False


def _solve_bits(grid: list[int], limit: int, rng: random.Random | None = None) -> list[str]:
    out: list[str] = []
    rows, cols, boxes = _masks(grid)
    _search(grid[:], rows, cols, boxes, out, limit, rng)
    return out


def solve(puzzle: str, limit: int = 2) -> list[str]:
    """Up to `limit` solutions of `puzzle` (empty if it has none), in a deterministic order.

    `puzzle` is anything `parse_grid` accepts; givens that clash (a digit twice in a unit) raise `ValueError`.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    p = parse_grid(puzzle)
    return _solve_bits([_CHAR_BIT[ch] for ch in p], limit)


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """The number of solutions of `puzzle`, counting no further than `limit` (so 2 means "two or more")."""
    return len(solve(puzzle, limit))


def is_unique(puzzle: str) -> bool:
    """True when `puzzle` has exactly one solution."""
    return count_solutions(puzzle, 2) == 1


# --------------------------------------------------------------------------------------------------------------
# Generator


def _rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _random_full_grid(rng: random.Random) -> list[int]:
    """A random complete grid: randomised backtracking fill, then a random relabelling and row/column/band/stack
    permutations (and a transpose half the time), all of which preserve validity."""
    sol = _solve_bits([0] * 81, 1, rng)[0]
    relabel = list("123456789")
    rng.shuffle(relabel)
    table = dict(zip("123456789", relabel))

    def order() -> list[int]:
        groups = [0, 1, 2]
        rng.shuffle(groups)
        out = []
        for g in groups:
            within = [0, 1, 2]
            rng.shuffle(within)
            out.extend(g * 3 + k for k in within)
        return out

    rows, cols = order(), order()
    transpose = rng.random() < 0.5
    cells = []
    for r in range(9):
        for c in range(9):
            rr, cc = (rows[c], cols[r]) if transpose else (rows[r], cols[c])
            cells.append(_CHAR_BIT[table[sol[rr * 9 + cc]]])
    return cells


def _other_solution(puzzle: list[int], i: int, bit: int) -> bool:
    """True when `puzzle` (cell `i` blank, known solution has `bit` there) has a solution with another digit at i."""
    rows, cols, boxes = _masks(puzzle)
    r, c, b = _ROW[i], _COL[i], _BOX[i]
    alternatives = _ALL & ~(rows[r] | cols[c] | boxes[b] | bit)
    for alt in _BITS[alternatives]:
        g = puzzle[:]
        g[i] = alt
        rs, cs, bs = rows[:], cols[:], boxes[:]
        rs[r] |= alt
        cs[c] |= alt
        bs[b] |= alt
        if _search(g, rs, cs, bs, [], 1, None):
            return True
    return False


def _blank_range(blanks: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(blanks, (tuple, list)):
        lo, hi = (operator.index(x) for x in blanks)
    else:
        lo = hi = operator.index(blanks)
    if not 0 <= lo <= hi <= MAX_BLANKS:
        raise ValueError(f"blanks must be an int or a (lo, hi) range with 0 <= lo <= hi <= {MAX_BLANKS}, "
                         f"got {blanks!r}")
    return lo, hi


def generate(rng: random.Random | int, blanks: int | tuple[int, int] = (30, 50), *,
             max_attempts: int = 100) -> tuple[str, str]:
    """A random puzzle with a unique solution, as ``(puzzle, solution)``.

    `blanks` is an exact count or an inclusive ``(lo, hi)`` range (the count is drawn uniformly). Cells are removed
    in random order, skipping any whose removal would allow a second solution, until the count is reached; if a
    grid runs out of removable cells first, a new grid is tried (up to `max_attempts`, then `RuntimeError`). Random
    removal stalls at 54-59 blanks (mostly 56-57), so up to 56 is quick, 57-59 slower, and 60+ practically fails.

    Deterministic for a given integer seed (or `random.Random` state).
    """
    lo, hi = _blank_range(blanks)
    rng = _rng(rng)
    target = rng.randint(lo, hi)
    for _ in range(max_attempts):
        solution = _random_full_grid(rng)
        puzzle = solution[:]
        order = list(range(81))
        rng.shuffle(order)
        removed = 0
        for i in order:
            if removed == target:
                break
            bit = puzzle[i]
            puzzle[i] = 0
            if _other_solution(puzzle, i, bit):
                puzzle[i] = bit
            else:
                removed += 1
        if removed == target:
            return "".join(_BIT_CHAR[b] for b in puzzle), "".join(_BIT_CHAR[b] for b in solution)
    raise RuntimeError(f"could not make a unique puzzle with {target} blanks in {max_attempts} attempts")


def dedupe(pairs: Iterable[tuple[str, str]], exclude: Iterable[str | tuple[str, str]] = (), *,
           by: str = "puzzle") -> list[tuple[str, str]]:
    """`pairs` in order without repeats and without anything in `exclude`.

    `by="puzzle"` compares puzzles; `by="solution"` compares solution grids (stricter: a held-out puzzle then never
    shares its filled grid with a training one). `exclude` holds pairs or bare strings of the compared kind.
    """
    if by not in ("puzzle", "solution"):
        raise ValueError(f"by must be 'puzzle' or 'solution', got {by!r}")
    k = 0 if by == "puzzle" else 1
    seen = {x if isinstance(x, str) else x[k] for x in exclude}
    out = []
    for pair in pairs:
        key = pair[k]
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


def generate_many(n: int, seed: int = 0, blanks: int | tuple[int, int] = (30, 50), *,
                  exclude: Iterable[str | tuple[str, str]] = (), by: str = "puzzle") -> list[tuple[str, str]]:
    """`n` distinct ``(puzzle, solution)`` pairs, none of them in `exclude` (compared `by` puzzle or solution).

    Puzzle k is drawn from its own stream seeded by ``(seed, k)``, so the result for a given seed is deterministic
    and a longer list extends a shorter one. For a held-out split use another seed and pass the training pairs (or
    the held-out ones, whichever is made second) as `exclude`, e.g.::

        test = generate_many(500, seed=1)
        train = generate_many(100_000, seed=0, exclude=test, by="solution")
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if by not in ("puzzle", "solution"):
        raise ValueError(f"by must be 'puzzle' or 'solution', got {by!r}")
    _blank_range(blanks)
    k = 0 if by == "puzzle" else 1
    seen = {x if isinstance(x, str) else x[k] for x in exclude}
    out: list[tuple[str, str]] = []
    index = 0
    while len(out) < n:
        pair = generate(random.Random(f"dgemma.sudoku:{seed}:{index}"), blanks)
        index += 1
        if pair[k] not in seen:
            seen.add(pair[k])
            out.append(pair)
    return out


# --------------------------------------------------------------------------------------------------------------
# Scoring


class CheckResult(TypedDict):
    """The result of `check`."""

    well_formed: bool  # exactly 81 ASCII digits
    valid: bool  # a complete, correct grid
    givens_kept: bool  # every given digit unchanged
    solved: bool  # valid and givens_kept
    cell_accuracy: float  # n_correct / n_blank (1.0 when the puzzle has no blanks)
    n_blank: int  # blank cells in the puzzle
    n_correct: int  # of those, cells whose answer digit equals the solution's


def check(puzzle: str, answer: object, solution: str | None = None) -> CheckResult:
    """Score `answer` (normally `parse_answer` of the model's output) against `puzzle`.

    A malformed answer (wrong length, non-digits, not a string) never raises: it is not `valid` and not `solved`;
    `givens_kept` and `cell_accuracy` compare position by position as far as the answer goes (missing cells count as
    wrong). `cell_accuracy` is measured against `solution` if given, else against the puzzle's solution (solved here;
    for a puzzle with several solutions, a valid answer keeping the givens counts as fully correct, otherwise the
    first solution found is used). A malformed or unsolvable `puzzle` raises `ValueError` (a caller's error).
    """
    p = parse_grid(puzzle)
    a = answer if isinstance(answer, str) else ""
    well_formed = len(a) == 81 and set(a) <= _DIGITS
    valid = well_formed and is_complete(a)
    n = len(a)
    givens_kept = all(i < n and a[i] == ch for i, ch in enumerate(p) if ch != "0")
    solved = valid and givens_kept
    if solution is not None:
        ref = parse_grid(solution)
    elif solved:
        ref = a
    else:
        found = solve(p, 1)
        if not found:
            raise ValueError("puzzle has no solution")
        ref = found[0]
    blanks = [i for i, ch in enumerate(p) if ch == "0"]
    n_correct = sum(1 for i in blanks if i < n and a[i] == ref[i])
    return CheckResult(well_formed=well_formed, valid=valid, givens_kept=givens_kept, solved=solved,
                       cell_accuracy=n_correct / len(blanks) if blanks else 1.0,
                       n_blank=len(blanks), n_correct=n_correct)


# --------------------------------------------------------------------------------------------------------------
# Text encoding and reporting


def prompt_text(puzzle: str) -> str:
    """The fine-tuning prompt (no chat template): the `PROMPT` instruction, the `CELLS` line, then the 81-digit
    puzzle, one per line."""
    return f"{PROMPT}\n{CELLS}\n{parse_grid(puzzle)}"


def task_info() -> dict:
    """What `task.json` next to a Sudoku model holds: how to frame a puzzle as a prompt (the server and its
    visualizer read it to draw the canvas as a 9x9 grid)."""
    return {"task": "sudoku", "prompt_template": f"{PROMPT}\n{CELLS}\n{{puzzle}}",
            "answer": "the 81 digits of the solved grid, row by row"}


def answer_text(solution: str) -> str:
    """The fine-tuning response: exactly the 81 digits of the solution (which must be a complete, correct grid)."""
    s = parse_grid(solution)
    if not is_complete(s):
        raise ValueError("solution must be a complete grid (no blanks)")
    return s


def parse_answer(text: str) -> str:
    """The first 81 ASCII digits in `text`, joined (other characters are skipped); '' if there are fewer."""
    digits = [ch for ch in text if ch in _DIGITS][:81]
    return "".join(digits) if len(digits) == 81 else ""


def blank_count(puzzle: str) -> int:
    """The number of blank cells in `puzzle`."""
    return parse_grid(puzzle).count("0")


def bucket(blanks: int, edges: Sequence[int] = (30, 35, 40, 45, 50)) -> str:
    """A difficulty label: ``"30-34"``, ``"35-39"``, ``"40-44"``, ``"45-50"`` for the default edges.

    Each bucket runs from one edge up to just below the next; the last one includes the final edge. Counts outside
    the edges give ``"<30"`` or ``">50"``.
    """
    edges = list(edges)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be at least two strictly increasing numbers, got {edges!r}")
    if blanks < edges[0]:
        return f"<{edges[0]}"
    if blanks > edges[-1]:
        return f">{edges[-1]}"
    for lo, hi in zip(edges[:-2], edges[1:-1]):
        if blanks < hi:
            return f"{lo}-{hi - 1}"
    return f"{edges[-2]}-{edges[-1]}"


def write_jsonl(path: str | os.PathLike[str], pairs: Iterable[tuple[str, str]]) -> int:
    """Write ``{"prompt", "response", "puzzle", "solution"}`` per pair to `path`, atomically; return the count.

    The lines go to a temporary file beside `path` that replaces it only once complete, so readers never see a
    partial file. Each solution is checked to be a complete grid that keeps the puzzle's givens (`ValueError`).
    Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for puzzle, solution in pairs:
                p, s = parse_grid(puzzle), answer_text(solution)
                if any(pc != "0" and pc != sc for pc, sc in zip(p, s)):
                    raise ValueError(f"solution does not keep the givens of puzzle {p}")
                f.write(json.dumps({"prompt": prompt_text(p), "response": s, "puzzle": p, "solution": s}) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The ``(puzzle, solution)`` pairs of a file written by `write_jsonl` (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append((row["puzzle"], row["solution"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """Generate a JSONL split: ``python -m dgemma.tasks.sudoku --n N --seed S --blanks LO HI --out PATH``."""
    ap = argparse.ArgumentParser(prog="python -m dgemma.tasks.sudoku", description="Generate a Sudoku JSONL split.")
    ap.add_argument("--n", type=int, required=True, help="number of puzzles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blanks", type=int, nargs=2, default=(30, 50), metavar=("LO", "HI"),
                    help="inclusive range of blank cells (default 30 50)")
    ap.add_argument("--out", required=True, help="output .jsonl path")
    ap.add_argument("--exclude", action="append", default=[], metavar="JSONL",
                    help="a split to stay disjoint from (repeatable)")
    ap.add_argument("--by", choices=("puzzle", "solution"), default="puzzle",
                    help="what must not repeat across splits (default puzzle)")
    args = ap.parse_args(argv)
    exclude = [pair for p in args.exclude for pair in read_jsonl(p)]
    t0 = time.perf_counter()
    pairs = generate_many(args.n, args.seed, tuple(args.blanks), exclude=exclude, by=args.by)
    dt = time.perf_counter() - t0
    count = write_jsonl(args.out, pairs)
    print(f"wrote {count} puzzles to {args.out} in {dt:.1f}s ({count / dt if dt else 0.0:.1f}/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
