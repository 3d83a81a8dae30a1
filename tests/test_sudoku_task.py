"""`dgemma.tasks.sudoku`: solver on known puzzles, generator (determinism, blank counts, uniqueness), validator,
grid parsing, text encoding, difficulty buckets and the JSONL writer. Pure Python; runs in a few seconds."""

from __future__ import annotations

import json
import random
import time

import pytest

from dgemma.tasks import sudoku as S

# The first puzzle of Gordon Royle's list of 17-clue puzzles.
HARD17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"
HARD17_SOLUTION = "693784512487512936125963874932651487568247391741398625319475268856129743274836159"
# Arto Inkala's 2012 "world's hardest sudoku" (21 clues), written with '.' blanks.
INKALA = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
INKALA_SOLUTION = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"
# Project Euler 96, grid 01.
EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
EASY_SOLUTION = "483921657967345821251876493548132976729564138136798245372689514814253769695417382"
# Peter Norvig's "hard1": not a proper puzzle (several solutions), and a heavy-tail case for fixed-order search.
NORVIG_HARD1 = ".....6....59.....82....8....45........3........6..3.54...325..6.................."


def _givens_kept(puzzle: str, grid: str) -> bool:
    return all(p == "0" or p == g for p, g in zip(S.parse_grid(puzzle), grid))


# ---------------------------------------------------------------------------------------------------------- solver


@pytest.mark.parametrize("puzzle,solution", [(HARD17, HARD17_SOLUTION), (INKALA, INKALA_SOLUTION),
                                             (EASY, EASY_SOLUTION)])
def test_solves_known_puzzles(puzzle, solution):
    t0 = time.perf_counter()
    found = S.solve(puzzle)
    assert time.perf_counter() - t0 < 1.0
    assert found == [solution]
    assert S.is_complete(solution) and _givens_kept(puzzle, solution)
    assert S.count_solutions(puzzle) == 1 and S.is_unique(puzzle)
    assert S.check(puzzle, solution)["solved"]


def test_hard17_has_17_givens():
    assert 81 - S.blank_count(HARD17) == 17


def test_multiple_solutions_detected():
    almost_empty = "1" + "0" * 80
    assert S.count_solutions(almost_empty) == 2
    assert not S.is_unique(almost_empty)
    sols = S.solve(almost_empty, limit=5)
    assert len(sols) == len(set(sols)) == 5
    assert all(S.is_complete(s) and s[0] == "1" for s in sols)
    assert S.count_solutions("0" * 81, limit=3) == 3


def test_heavy_tail_puzzle_is_fast():
    t0 = time.perf_counter()
    assert S.count_solutions(NORVIG_HARD1) == 2
    assert time.perf_counter() - t0 < 1.0


def test_no_solution():
    # Row 1 holds 1-8, so its last cell must be 9, but column 9 already has a 9.
    puzzle = "123456780" + "000000009" + "0" * 63
    assert S.solve(puzzle) == []
    assert S.count_solutions(puzzle) == 0 and not S.is_unique(puzzle)
    with pytest.raises(ValueError, match="no solution"):
        S.check(puzzle, "1" * 81)


def test_solve_rejects_bad_limit_and_clashing_givens():
    with pytest.raises(ValueError):
        S.solve(EASY, limit=0)
    with pytest.raises(ValueError, match="duplicate"):
        S.solve("11" + "0" * 79)


# ------------------------------------------------------------------------------------------------------- generator


def test_generate_deterministic_per_seed():
    a = S.generate(123)
    assert a == S.generate(123) == S.generate(random.Random(123))
    assert a != S.generate(124)
    many = S.generate_many(5, seed=1)
    assert many == S.generate_many(5, seed=1)
    assert S.generate_many(3, seed=1) == many[:3]  # a longer list extends a shorter one
    assert S.generate_many(5, seed=2) != many


@pytest.mark.parametrize("size, n, exclude", [(9, 7, 0), (6, 150, 0), (4, 120, 40)])
def test_generate_many_in_processes_gives_the_same_list(size, n, exclude):
    """workers > 1 draws the same streams in a pool and keeps them in order: the same list, repeats and `exclude`
    (4x4 has few distinct puzzles, so repeats happen) handled alike."""
    ex = S.generate_many(exclude, seed=9, size=size)
    one = S.generate_many(n, seed=4, size=size, exclude=ex)
    assert S.generate_many(n, seed=4, size=size, exclude=ex, workers=2) == one
    assert S.generate_many(n, seed=4, size=size, exclude=ex, workers=3) == one
    assert len(set(one)) == n and not set(one) & set(ex)
    with pytest.raises(ValueError, match="workers"):
        S.generate_many(3, workers=0)


def test_generated_puzzles_are_unique_and_consistent():
    pairs = S.generate_many(25, seed=0, blanks=(30, 50))
    counts = []
    for puzzle, solution in pairs:
        n = S.blank_count(puzzle)
        counts.append(n)
        assert 30 <= n <= 50
        assert S.is_complete(solution) and _givens_kept(puzzle, solution)
        assert S.count_solutions(puzzle) == 1
        assert S.solve(puzzle) == [solution]
    assert len(set(counts)) > 3  # the blank count varies over the range
    assert len({p for p, _ in pairs}) == len({s for _, s in pairs}) == 25


@pytest.mark.parametrize("blanks", [0, 1, 45, 55])
def test_generate_exact_blank_count(blanks):
    puzzle, solution = S.generate(7, blanks)
    assert S.blank_count(puzzle) == blanks
    assert S.is_unique(puzzle) and S.solve(puzzle) == [solution]
    if blanks == 0:
        assert puzzle == solution


@pytest.mark.parametrize("blanks", [-1, 65, (50, 30), (10, 70), (1, 2, 3)])
def test_generate_rejects_bad_blanks(blanks):
    with pytest.raises(ValueError):
        S.generate(0, blanks)


def test_held_out_split_is_disjoint():
    test = S.generate_many(8, seed=1, blanks=40)
    train = S.generate_many(20, seed=0, blanks=40, exclude=test, by="solution")
    assert len(train) == 20
    assert not {s for _, s in test} & {s for _, s in train}
    assert not {p for p, _ in test} & {p for p, _ in train}
    # Excluding by puzzle: a pair equal to one in `exclude` is skipped and replaced by the next draw.
    first = S.generate_many(3, seed=0, blanks=40)
    shifted = S.generate_many(3, seed=0, blanks=40, exclude=first[:1])
    assert shifted[:2] == first[1:] and shifted[2] not in first


# ------------------------------------------------------------------------------------------------------- validator


def test_check_correct():
    r = S.check(EASY, EASY_SOLUTION)
    assert r == {"well_formed": True, "valid": True, "givens_kept": True, "solved": True, "cell_accuracy": 1.0,
                 "n_blank": S.blank_count(EASY), "n_correct": S.blank_count(EASY)}


def test_check_wrong_cells_and_accuracy():
    blanks = [i for i, ch in enumerate(EASY) if ch == "0"]
    n = len(blanks)
    # Swap the digits of two blank cells in the same row that hold different digits: 2 of n wrong.
    i, j = next((i, j) for i in blanks for j in blanks
                if i < j and i // 9 == j // 9 and EASY_SOLUTION[i] != EASY_SOLUTION[j])
    ans = list(EASY_SOLUTION)
    ans[i], ans[j] = ans[j], ans[i]
    r = S.check(EASY, "".join(ans))
    assert r["well_formed"] and r["givens_kept"]
    assert not r["valid"] and not r["solved"]
    assert r["n_correct"] == n - 2 and r["cell_accuracy"] == pytest.approx((n - 2) / n)
    # Blanks left as 0: well formed, not valid, accuracy 0.
    r = S.check(EASY, EASY)
    assert r["well_formed"] and r["givens_kept"] and not r["valid"] and r["cell_accuracy"] == 0.0
    # Half the blanks filled.
    half = list(EASY)
    for k in blanks[: n // 2]:
        half[k] = EASY_SOLUTION[k]
    assert S.check(EASY, "".join(half))["cell_accuracy"] == pytest.approx((n // 2) / n)


def test_check_givens_changed():
    # Relabelling two digits keeps the grid valid but changes givens.
    swapped = EASY_SOLUTION.translate(str.maketrans("12", "21"))
    r = S.check(EASY, swapped)
    assert r["valid"] and r["well_formed"]
    assert not r["givens_kept"] and not r["solved"]
    assert 0.0 < r["cell_accuracy"] < 1.0


@pytest.mark.parametrize("answer", ["", "123", EASY_SOLUTION[:80], EASY_SOLUTION + "1", EASY_SOLUTION[:80] + "x",
                                    " " + EASY_SOLUTION[:80], EASY_SOLUTION.replace("4", "."), None, 42,
                                    list(EASY_SOLUTION)])
def test_check_malformed_never_raises(answer):
    r = S.check(EASY, answer)
    assert not r["well_formed"] and not r["valid"] and not r["solved"]
    assert 0.0 <= r["cell_accuracy"] <= 1.0
    assert set(r) == {"well_formed", "valid", "givens_kept", "solved", "cell_accuracy", "n_blank", "n_correct"}


def test_check_malformed_partial_credit_is_positional():
    assert EASY[80] == "0"
    r = S.check(EASY, EASY_SOLUTION[:80])  # the last (blank) cell is missing: counted wrong
    n = S.blank_count(EASY)
    assert r["n_correct"] == n - 1 and r["givens_kept"] and not r["solved"]
    r = S.check(EASY, "")
    assert r["cell_accuracy"] == 0.0 and not r["givens_kept"]


def test_check_with_explicit_solution_and_non_unique_puzzle():
    assert S.check(HARD17, HARD17_SOLUTION, solution=HARD17_SOLUTION)["solved"]
    almost_empty = "1" + "0" * 80
    a, b = S.solve(almost_empty, 2)
    assert S.check(almost_empty, b)["cell_accuracy"] == 1.0  # any valid completion is right
    r = S.check(almost_empty, b, solution=a)
    assert r["solved"] and r["cell_accuracy"] < 1.0  # measured against the given solution


def test_check_no_blanks():
    r = S.check(EASY_SOLUTION, EASY_SOLUTION)
    assert r["solved"] and r["n_blank"] == 0 and r["cell_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------- parse/format


def test_parse_grid_dots_and_trailing_text():
    canonical = INKALA.replace(".", "0")
    assert S.parse_grid(INKALA) == canonical
    assert S.parse_grid(INKALA + "  # Inkala 2012") == canonical
    assert S.parse_grid(INKALA + "\nmore lines") == canonical
    assert S.parse_grid("  " + INKALA + "\n") == canonical
    assert S.parse_grid(EASY) == EASY


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("   \n", "empty"), (EASY[:80], "81 cells, got 80"), (EASY + "0", "81 cells, got 82"),
    (EASY[:40] + "x" + EASY[41:], r"'x' at cell 40 \(row 5, column 5\)"),
    (EASY[:10] + "-" + EASY[11:], "invalid character '-'"),
    ("11" + "0" * 79, "duplicate digit 1 in row 1"),
    ("5" + "0" * 8 + "5" + "0" * 71, "duplicate digit 5 in column 1"),
    ("7" + "0" * 9 + "7" + "0" * 70, "duplicate digit 7 in box 1"),
])
def test_parse_grid_errors(text, match):
    with pytest.raises(ValueError, match=match):
        S.parse_grid(text)


def test_format_grid():
    text = S.format_grid(EASY)
    lines = text.splitlines()
    assert len(lines) == 9
    assert lines[0] == ". . 3 | . 2 . | 6 . ."
    ruled = S.format_grid(INKALA, rules=True).splitlines()
    assert len(ruled) == 11 and ruled[3] == ruled[7] == "------+-------+------"
    assert [line for line in ruled if "+" not in line] == S.format_grid(INKALA.replace(".", "0")).splitlines()
    assert S.parse_answer(S.format_grid(EASY_SOLUTION)) == EASY_SOLUTION
    with pytest.raises(ValueError):
        S.format_grid("123")


# -------------------------------------------------------------------------------------------------------- encoding


def test_encoding_round_trip():
    puzzle, solution = S.generate(11, 40)
    prompt = S.prompt_text(puzzle)
    assert prompt == S.CELLS + "\n" + puzzle
    assert S.legacy_prompt_text(puzzle) == "Solve this sudoku. 0 marks an empty cell.\n" + prompt
    assert len(S.CELLS) == len(set(S.CELLS)) == 81 and not set(S.CELLS) & set("0123456789<> \n")
    response = S.answer_text(solution)
    assert response == solution and len(response) == 81
    assert S.parse_answer(response) == solution
    assert S.check(puzzle, S.parse_answer(response))["solved"]
    assert S.prompt_text(INKALA).endswith(INKALA.replace(".", "0"))


def test_parse_answer():
    s = EASY_SOLUTION
    assert S.parse_answer(s + "<eos>") == s
    assert S.parse_answer("Answer:\n" + " ".join(s)) == s
    assert S.parse_answer(s + "123456") == s
    assert S.parse_answer(s[:80]) == ""
    assert S.parse_answer("") == ""
    assert S.parse_answer("\u0661" * 81) == ""  # non-ASCII digits do not count


def test_answer_text_rejects_incomplete():
    with pytest.raises(ValueError):
        S.answer_text(EASY)


# --------------------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("blanks,label", [(29, "<30"), (30, "30-34"), (34, "30-34"), (35, "35-39"), (39, "35-39"),
                                          (40, "40-44"), (44, "40-44"), (45, "45-50"), (50, "45-50"), (51, ">50")])
def test_bucket_default_edges(blanks, label):
    assert S.bucket(blanks) == label


def test_bucket_custom_edges_and_errors():
    assert S.bucket(12, edges=(10, 20)) == "10-20"
    assert S.bucket(20, edges=(10, 20)) == "10-20"
    assert S.bucket(15, edges=(10, 15, 20)) == "15-20"
    with pytest.raises(ValueError):
        S.bucket(30, edges=(30,))
    with pytest.raises(ValueError):
        S.bucket(30, edges=(30, 30, 40))


def test_blank_count():
    assert S.blank_count(EASY) == EASY.count("0")
    assert S.blank_count(INKALA) == INKALA.count(".") == 60
    assert S.blank_count(EASY_SOLUTION) == 0


# ------------------------------------------------------------------------------------------------------------ jsonl


def test_write_jsonl(tmp_path):
    pairs = S.generate_many(4, seed=9, blanks=(30, 50))
    path = tmp_path / "sub" / "train.jsonl"
    assert S.write_jsonl(path, iter(pairs)) == 4
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    for row, (puzzle, solution) in zip(rows, pairs):
        assert row == {"prompt": S.prompt_text(puzzle), "response": solution, "puzzle": puzzle, "solution": solution}
    assert S.read_jsonl(path) == pairs
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]  # no temp file left
    # Overwrite atomically; an inconsistent pair fails and leaves the previous file intact, with no temp file.
    assert S.write_jsonl(path, pairs[:2]) == 2
    bad = [pairs[0], (pairs[1][0], pairs[2][1])]
    with pytest.raises(ValueError):
        S.write_jsonl(path, bad)
    assert S.read_jsonl(path) == pairs[:2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]
    assert S.write_jsonl(tmp_path / "empty.jsonl", []) == 0
    assert (tmp_path / "empty.jsonl").read_text() == ""


def test_cli_main(tmp_path, capsys):
    test = tmp_path / "test.jsonl"
    train = tmp_path / "train.jsonl"
    assert S.main(["--n", "3", "--seed", "1", "--blanks", "35", "40", "--out", str(test)]) == 0
    assert S.main(["--n", "5", "--seed", "0", "--blanks", "35", "40", "--out", str(train), "--exclude", str(test),
                   "--by", "solution"]) == 0
    test_pairs, train_pairs = S.read_jsonl(test), S.read_jsonl(train)
    assert len(test_pairs) == 3 and len(train_pairs) == 5
    assert all(35 <= S.blank_count(p) <= 40 for p, _ in test_pairs + train_pairs)
    assert not {s for _, s in test_pairs} & {s for _, s in train_pairs}
    assert "wrote 5 puzzles" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ other box shapes
# A 6x6 grid with boxes of 2 rows by 3 columns, and a 4x4 one with 2x2 boxes (checked by hand).
SIX_SOLUTION = "123456456123231564564231312645645312"
FOUR_SOLUTION = "1234341221434321"


def _units(n: int, br: int, bc: int) -> list[list[int]]:
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(R + r) * n + C + c for r in range(br) for c in range(bc)] for R in range(0, n, br)
             for C in range(0, n, bc)]
    return rows + cols + boxes


def test_shapes():
    assert S.shape_of(36) == S.shape_of(6) == S.shape_of("0" * 36) == S.Shape(2, 3)
    assert (S.shape_of(16).n, S.shape_of(81).n) == (4, 9)
    assert S.shape_of(6).box_rows == 2 and S.shape_of(6).box_cols == 3
    with pytest.raises(ValueError, match="unsupported sudoku size 25"):
        S.shape_of(25)


@pytest.mark.parametrize("grid,n,br,bc", [(SIX_SOLUTION, 6, 2, 3), (FOUR_SOLUTION, 4, 2, 2)])
def test_small_grids_complete(grid, n, br, bc):
    assert S.is_complete(grid)
    # Swapping two columns of different stacks keeps rows and columns but breaks the boxes.
    swapped = "".join(row[:bc - 1] + row[bc] + row[bc - 1] + row[bc + 1:] for row in
                      (grid[r * n:(r + 1) * n] for r in range(n)))
    assert all(len({swapped[i] for i in u}) == n for u in _units(n, br, bc)[:2 * n])
    assert not S.is_complete(swapped)
    assert S.solve(grid) == [grid]


def test_six_by_six_boxes_are_two_rows_by_three_columns():
    # Digit 1 at (row 1, column 1) and (row 2, column 3): same 2x3 box, so the grid is invalid.
    with pytest.raises(ValueError, match="duplicate digit 1 in box 1"):
        S.parse_grid("1" + "0" * 7 + "1" + "0" * 27)
    # ... but (row 3, column 1) is in the next box down.
    S.parse_grid("1" + "0" * 13 + "1" + "0" * 21)


@pytest.mark.parametrize("size", [4, 6])
def test_generate_small_unique(size):
    shape = S.shape_of(size)
    pairs = S.generate_many(30, seed=3, size=size)
    assert len({p for p, _ in pairs}) == 30
    lo, hi = S.default_blanks(size)
    for p, s in pairs:
        assert len(p) == len(s) == shape.cells
        assert lo <= S.blank_count(p) <= hi
        assert S.is_complete(s) and S.solve(p) == [s]
        assert all(len({s[i] for i in u}) == size for u in _units(size, shape.box_rows, shape.box_cols))
        assert S.check(p, s)["solved"]
    assert S.generate_many(30, seed=3, size=size) == pairs  # deterministic
    assert S.generate_many(5, seed=4, size=size) != pairs[:5]
    # The 9x9 streams are unchanged by the other sizes.
    assert S.generate_many(2, seed=3) == [S.generate(__import__("random").Random(f"dgemma.sudoku:3:{k}"))
                                         for k in range(2)]


def test_small_grid_errors_and_format():
    with pytest.raises(ValueError, match="invalid character '7' at cell 3"):
        S.parse_grid("0007" + "0" * 32)  # 7 is not a 6x6 digit
    with pytest.raises(ValueError, match="36 cells, got 81"):
        S.parse_grid("0" * 81, size=6)
    with pytest.raises(ValueError, match="at most|<= 28"):
        S.generate(0, blanks=30, size=6)
    assert S.format_grid(SIX_SOLUTION, rules=True).splitlines() == [
        "1 2 3 | 4 5 6", "4 5 6 | 1 2 3", "------+------", "2 3 1 | 5 6 4", "5 6 4 | 2 3 1", "------+------",
        "3 1 2 | 6 4 5", "6 4 5 | 3 1 2"]
    assert S.format_grid(FOUR_SOLUTION).splitlines()[0] == "1 2 | 3 4"


def test_small_grid_encoding_and_check():
    p = "0" + SIX_SOLUTION[1:]
    assert S.prompt_text(p) == S.CELLS[:36] + "\n" + p
    assert S.parse_answer(" ".join(SIX_SOLUTION) + "<end>", 6) == SIX_SOLUTION
    assert S.parse_answer(SIX_SOLUTION[:35], 6) == ""
    r = S.check(p, SIX_SOLUTION)
    assert r["solved"] and r["n_blank"] == 1 and r["cell_accuracy"] == 1.0
    assert not S.check(p, "2" + SIX_SOLUTION[1:])["solved"]
    assert not S.check(p, SIX_SOLUTION + "1")["well_formed"]
    info = S.task_info(6)
    assert (info["size"], info["box_rows"], info["box_cols"]) == (6, 2, 3)
    assert info["prompt_template"].replace("{puzzle}", p) == S.prompt_text(p)
    assert S.bucket(S.blank_count(p), S.bucket_edges(6)).startswith("<")
