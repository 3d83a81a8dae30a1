"""Sudoku of any box shape as a denoising task: n x n grids with r x c boxes (4x4 with 2x2 boxes, 6x6 with boxes of
2 rows by 3 columns, 9x9 with 3x3).

A grid is a string of n*n ASCII digits in row-major order, `0` for an empty cell; its size is read from its length
(16, 36 or 81 cells, see `SHAPES`). Everything here is pure Python (standard library only) and deterministic for a
given seed.

- `Shape` / `SHAPES` / `shape_of`: the grid sizes and their boxes.
- `parse_grid` / `format_grid`: read a grid (`0` or `.` for blanks; text after the first whitespace is ignored)
  with clear errors, and print one for humans.
- `solve` / `count_solutions` / `is_unique`: exact solver (bitmask constraint propagation with naked and hidden
  singles, then minimum-remaining-values backtracking over cells and unit/digit places); the hardest known 9x9
  puzzles take milliseconds.
- `generate` / `generate_many`: puzzles with a unique solution and a requested number of blanks, and training /
  held-out splits that share no puzzle (or, with ``by="solution"``, no solution grid).
- `check`: score a model's answer (`valid`, `givens_kept`, `solved`, `cell_accuracy`); never raises on a
  malformed answer.
- `prompt_text` / `answer_text` / `parse_answer`: the fine-tuning text encoding (no chat-template tokens).
- `blank_count` / `bucket`: per-difficulty reporting.
- `write_jsonl` / `read_jsonl`: ``{"prompt", "response", "puzzle", "solution"}`` per line, written atomically.

Command line: ``python -m dgemma.tasks.sudoku --n 1000 --seed 0 --size 6 --blanks 10 24 --out train.jsonl
[--exclude test.jsonl] [--by solution]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import operator
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

__all__ = [
    "Shape", "SHAPES", "shape_of", "PROMPT", "CELLS", "MAX_BLANKS", "parse_grid", "format_grid", "solve",
    "count_solutions", "is_unique", "is_complete", "generate", "generate_many", "check", "CheckResult",
    "prompt_text", "legacy_prompt_text", "task_info", "answer_text", "parse_answer", "blank_count", "bucket",
    "default_blanks", "write_jsonl", "read_jsonl",
]

PROMPT = "Solve this sudoku. 0 marks an empty cell."
"""The instruction line of `legacy_prompt_text` (the first bundled 9x9 model's prompt); newer prompts drop it."""

CELLS = "".join(c for c in map(chr, range(33, 127)) if c not in "0123456789<>\\")
"""One distinct printable character per cell (row-major; the first n*n are used), written on its own line above
the puzzle. A model without absolute position embeddings can then learn each cell's row, column and box from a
token instead of having to infer them from relative positions: cell i of the puzzle and of the answer sit a fixed
distance after its name."""
assert len(CELLS) == 81 and len(set(CELLS)) == 81

_DIGITS = frozenset("0123456789")


@dataclass(frozen=True)
class Shape:
    """An n x n grid with boxes of `box_rows` rows by `box_cols` columns (n = box_rows * box_cols)."""

    box_rows: int
    box_cols: int

    @property
    def n(self) -> int:
        return self.box_rows * self.box_cols

    @property
    def cells(self) -> int:
        return self.n * self.n

    @property
    def name(self) -> str:
        return f"{self.n}x{self.n}"

    @property
    def max_blanks(self) -> int:
        """An upper bound on blanks with a unique solution (the known minimum number of givens: 4, 8, 17)."""
        return self.cells - {4: 4, 6: 8, 9: 17}[self.n]


SHAPES: dict[int, Shape] = {16: Shape(2, 2), 36: Shape(2, 3), 81: Shape(3, 3)}
"""Supported grids by cell count: 4x4 (2x2 boxes), 6x6 (boxes of 2 rows by 3 columns), 9x9 (3x3)."""

MAX_BLANKS = SHAPES[81].max_blanks
"""No 9x9 puzzle with fewer than 17 givens has a unique solution, so at most 81 - 17 blanks."""


def shape_of(size: int | str | Shape) -> Shape:
    """The `Shape` for a side length (4, 6, 9), a cell count (16, 36, 81), a grid string, or a `Shape`."""
    if isinstance(size, Shape):
        return size
    if isinstance(size, str):
        size = len(size)
    for cells, shape in SHAPES.items():
        if size in (cells, shape.n):
            return shape
    sizes = ", ".join(f"{s.name} ({c} cells)" for c, s in SHAPES.items())
    raise ValueError(f"unsupported sudoku size {size}: expected {sizes}")


class _Geometry:
    """Lookup tables for one shape: each cell's row, column and box, the units (rows, columns, boxes) and the
    bit-mask helpers (bit d-1 set <=> digit d)."""

    def __init__(self, shape: Shape):
        n, br, bc = shape.n, shape.box_rows, shape.box_cols
        self.shape, self.n, self.cells = shape, n, n * n
        self.all = (1 << n) - 1
        self.row = tuple(i // n for i in range(n * n))
        self.col = tuple(i % n for i in range(n * n))
        self.box = tuple((i // n) // br * br + (i % n) // bc for i in range(n * n))
        self.units: tuple[tuple[int, ...], ...] = (
            tuple(tuple(r * n + c for c in range(n)) for r in range(n))
            + tuple(tuple(r * n + c for r in range(n)) for c in range(n))
            + tuple(tuple(i for i in range(n * n) if self.box[i] == b) for b in range(n))
        )
        self.unit_names = tuple(f"{kind} {k + 1}" for kind in ("row", "column", "box") for k in range(n))
        self.pop = tuple(bin(m).count("1") for m in range(1 << n))
        self.bits = tuple(tuple(1 << d for d in range(n) if m >> d & 1) for m in range(1 << n))
        self.bit_char = {1 << d: str(d + 1) for d in range(n)}
        self.bit_char[0] = "0"
        self.char_bit = {str(d + 1): 1 << d for d in range(n)}
        self.char_bit["0"] = 0
        self.digits = frozenset("0123456789"[:n + 1])


@functools.cache
def _geometry(shape: Shape) -> _Geometry:
    return _Geometry(shape)


def _geo(size: int | str | Shape) -> _Geometry:
    return _geometry(shape_of(size))


def units(size: int | str | Shape) -> tuple[tuple[int, ...], ...]:
    """The cell indices (row-major) of every row, then every column, then every box of the grid."""
    return _geo(size).units


# --------------------------------------------------------------------------------------------------------------
# Representation


def parse_grid(text: str, size: int | None = None) -> str:
    """Return the canonical form (`0` for blanks) of `text`, a 16-, 36- or 81-cell grid.

    Accepts digits with `0` or `.` for blanks; leading whitespace is skipped and everything from the first
    whitespace after the grid on is ignored (so ``"<grid> # comment"`` and ``"<grid>\\n"`` are fine). The size comes
    from the length unless `size` (side or cell count) is given. Raises `ValueError` naming the problem: an empty
    input, a wrong length, a bad character (with its row and column), or a digit given twice in a row, column or box.
    """
    if not isinstance(text, str):
        raise ValueError(f"sudoku grid must be a string, got {type(text).__name__}")
    parts = text.split(maxsplit=1)
    if not parts:
        raise ValueError("empty sudoku grid: expected 16, 36 or 81 cells")
    s = parts[0]
    if size is not None:
        shape = shape_of(size)
        if len(s) != shape.cells:
            raise ValueError(f"sudoku grid must have {shape.cells} cells, got {len(s)}")
    elif len(s) not in SHAPES:
        raise ValueError(f"sudoku grid must have 16, 36 or 81 cells, got {len(s)} (4x4, 6x6 or 9x9 grids)")
    g = _geo(len(s))
    s = s.replace(".", "0")
    for i, ch in enumerate(s):
        if ch not in g.digits:
            raise ValueError(f"invalid character {ch!r} at cell {i} (row {i // g.n + 1}, column {i % g.n + 1}); "
                             f"expected a digit 1-{g.n}, or 0 or . for a blank")
    for name, unit in zip(g.unit_names, g.units):
        seen: dict[str, int] = {}
        for i in unit:
            ch = s[i]
            if ch == "0":
                continue
            if ch in seen:
                raise ValueError(f"duplicate digit {ch} in {name} (cells {seen[ch]} and {i})")
            seen[ch] = i
    return s


def format_grid(s: str, *, rules: bool = False) -> str:
    """A human-readable grid: one line per row such as ``5 3 . | . 7 . | . . .`` (blanks shown as `.`).

    With ``rules=True`` a ``------+-------+------`` line separates the bands of boxes. `s` must have 16, 36 or 81
    characters (`0` or `.` for blanks) but is otherwise not validated, so a wrong answer can be shown too.
    """
    if len(s) not in SHAPES:
        raise ValueError(f"sudoku grid must have 16, 36 or 81 cells, got {len(s)}")
    shape = SHAPES[len(s)]
    n, br, bc = shape.n, shape.box_rows, shape.box_cols
    lines = []
    for r in range(n):
        cells = ["." if ch in "0." else ch for ch in s[r * n:r * n + n]]
        lines.append(" | ".join(" ".join(cells[k:k + bc]) for k in range(0, n, bc)))
        if rules and r % br == br - 1 and r < n - 1:
            lines.append("+".join("-" * (2 * bc + (0 if k in (0, n - bc) else 1)) for k in range(0, n, bc)))
    return "\n".join(lines)


def is_complete(s: str) -> bool:
    """True when `s` is a full, correct grid (16, 36 or 81 digits): every row, column and box a permutation."""
    if not isinstance(s, str) or len(s) not in SHAPES:
        return False
    g = _geo(len(s))
    if "0" in s or not set(s) <= g.digits:
        return False
    return all(len({s[i] for i in unit}) == g.n for unit in g.units)


# --------------------------------------------------------------------------------------------------------------
# Solver. State: `grid` is n*n bit masks (0 = empty, else the single bit of the digit); `rows`, `cols`, `boxes`
# hold the digits used in each unit. `_search` mutates its arguments, so callers pass copies.


def _masks(g: _Geometry, grid: list[int]) -> tuple[list[int], list[int], list[int]]:
    rows, cols, boxes = [0] * g.n, [0] * g.n, [0] * g.n
    for i, bit in enumerate(grid):
        if bit:
            rows[g.row[i]] |= bit
            cols[g.col[i]] |= bit
            boxes[g.box[i]] |= bit
    return rows, cols, boxes


def _search(g: _Geometry, grid: list[int], rows: list[int], cols: list[int], boxes: list[int], out: list[str],
            limit: int, rng: random.Random | None) -> bool:
    """Append solutions of the state to `out`; True once `out` holds `limit` (stop searching)."""
    ROW, COL, BOX, POP, ALL, N = g.row, g.col, g.box, g.pop, g.all, g.cells
    cand = [0] * N
    while True:
        # Naked singles, dead ends, and the empty cell with the fewest candidates.
        best, best_n, progress = -1, g.n + 1, False
        for i in range(N):
            if grid[i]:
                continue
            r, c, b = ROW[i], COL[i], BOX[i]
            m = ALL & ~(rows[r] | cols[c] | boxes[b])
            if not m:
                return False
            n = POP[m]
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
            out.append("".join([g.bit_char[bit] for bit in grid]))
            return len(out) >= limit
        # Hidden singles: a digit with exactly one possible cell in a unit. `cand` may be stale (a superset of the
        # truth) after placements in this pass, so each placement is re-checked against the unit masks. Also note a
        # digit with exactly two places in a unit (`bu`, `bd`): if every cell has 3+ candidates, branching there is
        # narrower (this removes the heavy tail on puzzles such as Norvig's "hard1").
        bu, bd, bn = -1, 0, best_n
        for u, unit in enumerate(g.units):
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
            if (once | placed) != ALL:
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
                r, c, b = ROW[i], COL[i], BOX[i]
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
            cells = [i for i in g.units[bu] if not grid[i] and cand[i] & bd]
            if rng is not None:
                rng.shuffle(cells)
            for i in cells:
                r, c, b = ROW[i], COL[i], BOX[i]
                gr = grid[:]
                gr[i] = bd
                rs, cs, bs = rows[:], cols[:], boxes[:]
                rs[r] |= bd
                cs[c] |= bd
                bs[b] |= bd
                if _search(g, gr, rs, cs, bs, out, limit, rng):
                    return True
            return False
        # Otherwise branch on the cell with the fewest candidates.
        bits = list(g.bits[cand[best]])
        if rng is not None:
            rng.shuffle(bits)
        r, c, b = ROW[best], COL[best], BOX[best]
        for bit in bits:
            gr = grid[:]
            gr[best] = bit
            rs, cs, bs = rows[:], cols[:], boxes[:]
            rs[r] |= bit
            cs[c] |= bit
            bs[b] |= bit
            if _search(g, gr, rs, cs, bs, out, limit, rng):
                return True
        return False


def _solve_bits(g: _Geometry, grid: list[int], limit: int, rng: random.Random | None = None) -> list[str]:
    out: list[str] = []
    rows, cols, boxes = _masks(g, grid)
    _search(g, grid[:], rows, cols, boxes, out, limit, rng)
    return out


def solve(puzzle: str, limit: int = 2) -> list[str]:
    """Up to `limit` solutions of `puzzle` (empty if it has none), in a deterministic order.

    `puzzle` is anything `parse_grid` accepts; givens that clash (a digit twice in a unit) raise `ValueError`.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    p = parse_grid(puzzle)
    g = _geo(p)
    return _solve_bits(g, [g.char_bit[ch] for ch in p], limit)


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


def _random_full_grid(g: _Geometry, rng: random.Random) -> list[int]:
    """A random complete grid: randomised backtracking fill, then a random relabelling and row/column/band/stack
    permutations (and, for square boxes, a transpose half the time), all of which preserve validity."""
    sol = _solve_bits(g, [0] * g.cells, 1, rng)[0]
    digits = [str(d + 1) for d in range(g.n)]
    relabel = digits[:]
    rng.shuffle(relabel)
    table = dict(zip(digits, relabel))

    def order(size: int) -> list[int]:  # groups of `size` lines, shuffled, and the lines within each group
        groups = list(range(g.n // size))
        rng.shuffle(groups)
        out = []
        for grp in groups:
            within = list(range(size))
            rng.shuffle(within)
            out.extend(grp * size + k for k in within)
        return out

    n = g.n
    rows, cols = order(g.shape.box_rows), order(g.shape.box_cols)
    transpose = g.shape.box_rows == g.shape.box_cols and rng.random() < 0.5
    cells = []
    for r in range(n):
        for c in range(n):
            rr, cc = (rows[c], cols[r]) if transpose else (rows[r], cols[c])
            cells.append(g.char_bit[table[sol[rr * n + cc]]])
    return cells


def _other_solution(g: _Geometry, puzzle: list[int], i: int, bit: int) -> bool:
    """True when `puzzle` (cell `i` blank, known solution has `bit` there) has a solution with another digit at i."""
    rows, cols, boxes = _masks(g, puzzle)
    r, c, b = g.row[i], g.col[i], g.box[i]
    for alt in g.bits[g.all & ~(rows[r] | cols[c] | boxes[b] | bit)]:
        gr = puzzle[:]
        gr[i] = alt
        rs, cs, bs = rows[:], cols[:], boxes[:]
        rs[r] |= alt
        cs[c] |= alt
        bs[b] |= alt
        if _search(g, gr, rs, cs, bs, [], 1, None):
            return True
    return False


def default_blanks(size: int | str | Shape = 9) -> tuple[int, int]:
    """The blank-count range used for training and evaluation: 30-50 for 9x9; for smaller grids the full range
    that random removal reaches reliably while keeping a unique solution (4x4: 4-11, 6x6: 8-24)."""
    return {4: (4, 11), 6: (8, 24), 9: (30, 50)}[shape_of(size).n]


def _blank_range(blanks: int | tuple[int, int], shape: Shape) -> tuple[int, int]:
    if isinstance(blanks, (tuple, list)):
        lo, hi = (operator.index(x) for x in blanks)
    else:
        lo = hi = operator.index(blanks)
    if not 0 <= lo <= hi <= shape.max_blanks:
        raise ValueError(f"blanks must be an int or a (lo, hi) range with 0 <= lo <= hi <= {shape.max_blanks} "
                         f"for {shape.name}, got {blanks!r}")
    return lo, hi


def generate(rng: random.Random | int, blanks: int | tuple[int, int] | None = None, *, size: int = 9,
             max_attempts: int = 100) -> tuple[str, str]:
    """A random `size` x `size` puzzle with a unique solution, as ``(puzzle, solution)``.

    `blanks` is an exact count or an inclusive ``(lo, hi)`` range (the count is drawn uniformly; default
    `default_blanks(size)`). Cells are removed in random order, skipping any whose removal would allow a second
    solution, until the count is reached; if a grid runs out of removable cells first, a new grid is tried (up to
    `max_attempts`, then `RuntimeError`). For 9x9, random removal stalls at 54-59 blanks (mostly 56-57), so up to 56
    is quick, 57-59 slower, and 60+ practically fails.

    Deterministic for a given integer seed (or `random.Random` state).
    """
    shape = shape_of(size)
    g = _geometry(shape)
    lo, hi = _blank_range(default_blanks(shape) if blanks is None else blanks, shape)
    rng = _rng(rng)
    target = rng.randint(lo, hi)
    for _ in range(max_attempts):
        solution = _random_full_grid(g, rng)
        puzzle = solution[:]
        order = list(range(g.cells))
        rng.shuffle(order)
        removed = 0
        for i in order:
            if removed == target:
                break
            bit = puzzle[i]
            puzzle[i] = 0
            if _other_solution(g, puzzle, i, bit):
                puzzle[i] = bit
            else:
                removed += 1
        if removed == target:
            return "".join(g.bit_char[b] for b in puzzle), "".join(g.bit_char[b] for b in solution)
    raise RuntimeError(f"could not make a unique {shape.name} puzzle with {target} blanks in {max_attempts} attempts")


def _generate_indexed(stream: str, seed: int, start: int, stop: int, blanks, size: int) -> list[tuple[str, str]]:
    return [generate(random.Random(f"{stream}:{seed}:{i}"), blanks, size=size) for i in range(start, stop)]


def generate_many(n: int, seed: int = 0, blanks: int | tuple[int, int] | None = None, *, size: int = 9,
                  exclude: Iterable[str | tuple[str, str]] = (), by: str = "puzzle",
                  workers: int = 1) -> list[tuple[str, str]]:
    """`n` distinct ``(puzzle, solution)`` pairs, none of them in `exclude` (compared `by` puzzle or solution).

    Puzzle k is drawn from its own stream seeded by ``(size, seed, k)``, so the result for a given seed is
    deterministic and a longer list extends a shorter one. For a held-out split use another seed and pass the
    training pairs (or the held-out ones, whichever is made second) as `exclude`, e.g.::

        test = generate_many(500, seed=1, size=6)
        train = generate_many(100_000, seed=0, size=6, exclude=test, by="solution")

    `workers` > 1 draws the streams in that many processes (9x9 takes ~6 ms a puzzle): the same list as one.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if by not in ("puzzle", "solution"):
        raise ValueError(f"by must be 'puzzle' or 'solution', got {by!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    shape = shape_of(size)
    blanks = default_blanks(shape) if blanks is None else blanks
    _blank_range(blanks, shape)
    k = 0 if by == "puzzle" else 1
    seen = {x if isinstance(x, str) else x[k] for x in exclude}
    stream = "dgemma.sudoku" if shape.n == 9 else f"dgemma.sudoku{shape.n}"  # 9x9 keeps its original streams
    out: list[tuple[str, str]] = []
    index = 0
    pool = None
    if workers > 1 and n > 1:
        pool = concurrent.futures.ProcessPoolExecutor(workers)
    try:
        while len(out) < n:
            # Draw candidates for the next stream indices (in parallel with a pool), then keep them in index
            # order, skipping repeats: the same choices as drawing one index at a time.
            want = n - len(out)
            if pool is None:
                batch = _generate_indexed(stream, seed, index, index + 1, blanks, shape.n)
            else:
                chunk = max(1, min(2000, -(-want // workers)))
                starts = range(index, index + want, chunk)
                stops = [min(a + chunk, index + want) for a in starts]
                draw = functools.partial(_generate_indexed, stream, seed, blanks=blanks, size=shape.n)
                batch = [pair for part in pool.map(draw, starts, stops) for pair in part]
            index += len(batch)
            for pair in batch:
                if pair[k] not in seen and len(out) < n:
                    seen.add(pair[k])
                    out.append(pair)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


# --------------------------------------------------------------------------------------------------------------
# Scoring


class CheckResult(TypedDict):
    """The result of `check`."""

    well_formed: bool  # exactly n*n ASCII digits, as many as the puzzle has cells
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
    well_formed = len(a) == len(p) and set(a) <= _DIGITS
    valid = well_formed and is_complete(a)
    n = len(a)
    givens_kept = all(i < n and a[i] == ch for i, ch in enumerate(p) if ch != "0")
    solved = valid and givens_kept
    if solution is not None:
        ref = parse_grid(solution, len(p))
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
    """The fine-tuning prompt (no chat template, no instruction): the first n*n `CELLS` naming the cells, then the
    puzzle, one per line."""
    p = parse_grid(puzzle)
    return f"{CELLS[:len(p)]}\n{p}"


def legacy_prompt_text(puzzle: str) -> str:
    """The first bundled 9x9 model's prompt: the `PROMPT` instruction, the `CELLS` line, then the puzzle."""
    return f"{PROMPT}\n{CELLS}\n{parse_grid(puzzle, 9)}"


def task_info(size: int = 9) -> dict:
    """What `task.json` next to a Sudoku model holds: the grid (size, box rows and columns) and how to frame a
    puzzle as a prompt (`dgemma sudoku` and the server's visualizer read it)."""
    shape = shape_of(size)
    return {"task": "sudoku", "size": shape.n, "box_rows": shape.box_rows, "box_cols": shape.box_cols,
            "prompt_template": f"{CELLS[:shape.cells]}\n{{puzzle}}",
            "answer": f"the {shape.cells} digits of the solved grid, row by row"}


def answer_text(solution: str) -> str:
    """The fine-tuning response: exactly the digits of the solution (which must be a complete, correct grid)."""
    s = parse_grid(solution)
    if not is_complete(s):
        raise ValueError("solution must be a complete grid (no blanks)")
    return s


def parse_answer(text: str, size: int = 9) -> str:
    """The first n*n ASCII digits in `text` for an n x n grid, joined (other characters are skipped); '' if there
    are fewer."""
    cells = shape_of(size).cells
    digits = [ch for ch in text if ch in _DIGITS][:cells]
    return "".join(digits) if len(digits) == cells else ""


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


def bucket_edges(size: int = 9) -> tuple[int, ...]:
    """The blank-count bucket edges reported for a grid size (four buckets over `default_blanks`)."""
    return {4: (4, 6, 8, 10, 11), 6: (8, 12, 16, 20, 24), 9: (30, 35, 40, 45, 50)}[shape_of(size).n]


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
                if len(p) != len(s) or any(pc != "0" and pc != sc for pc, sc in zip(p, s)):
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
    """Generate a JSONL split: ``python -m dgemma.tasks.sudoku --n N --seed S --size 6 --out PATH``."""
    ap = argparse.ArgumentParser(prog="python -m dgemma.tasks.sudoku", description="Generate a Sudoku JSONL split.")
    ap.add_argument("--n", type=int, required=True, help="number of puzzles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=9, choices=(4, 6, 9), help="grid side (default 9)")
    ap.add_argument("--blanks", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                    help="inclusive range of blank cells (default: default_blanks(size), 30 50 for 9x9)")
    ap.add_argument("--out", required=True, help="output .jsonl path")
    ap.add_argument("--exclude", action="append", default=[], metavar="JSONL",
                    help="a split to stay disjoint from (repeatable)")
    ap.add_argument("--by", choices=("puzzle", "solution"), default="puzzle",
                    help="what must not repeat across splits (default puzzle)")
    args = ap.parse_args(argv)
    exclude = [pair for p in args.exclude for pair in read_jsonl(p)]
    t0 = time.perf_counter()
    blanks = tuple(args.blanks) if args.blanks else None
    pairs = generate_many(args.n, args.seed, blanks, size=args.size, exclude=exclude, by=args.by)
    dt = time.perf_counter() - t0
    count = write_jsonl(args.out, pairs)
    print(f"wrote {count} puzzles to {args.out} in {dt:.1f}s ({count / dt if dt else 0.0:.1f}/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
