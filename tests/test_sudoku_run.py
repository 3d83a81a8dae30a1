"""`dgemma.tasks.sudoku_run` and `dgemma sudoku solve|eval`: the output contract, not accuracy.

The model is a random tiny checkpoint whose canvas holds the 81 digits plus an end token (`canvas_length=82`); it
solves nothing, so the tests check the shape of what comes back (one JSON object per input line, in order; per-line
errors; normalised puzzles), determinism and batch independence of `solve_batch`, the structure of `evaluate`, and
`score` on hand-made answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.cli import main as cli_main
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.tasks import sudoku, sudoku_run

# Project Euler 96, grid 01.
EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
EASY_SOLUTION = "483921657967345821251876493548132976729564138136798245372689514814253769695417382"
# The first puzzle of Gordon Royle's 17-clue list.
HARD17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"
HARD17_SOLUTION = "693784512487512936125963874932651487568247391741398625319475268856129743274836159"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
MAX_STEPS = 48  # the random checkpoint's generation_config max_denoising_steps


def run_cli(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma.cli", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", env=ENV, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sudoku_model") / "tiny82"
    write_random_checkpoint(out, "tiny", seed=0, canvas_length=82)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    m = dgemma.load_model(model_dir)
    assert m.config.canvas_length == 82
    return m


@pytest.fixture(scope="module")
def puzzles() -> list[str]:
    return [p for p, _ in sudoku.generate_many(4, seed=7)]


def _dotted(p: str) -> str:
    return p.replace("0", ".")


def _duplicate_row(p: str) -> str:
    """EASY with cell 0 (blank) set to the digit of cell 2 (a 3): a 3 twice in row 1."""
    assert p[0] == "0" and p[2] == "3"
    return "3" + p[1:]


# Line numbers are 1-based file lines (blank lines count, but produce no output).
FILE_LINES = [
    EASY,                                   # 1 valid, 0 blanks
    _dotted(HARD17),                        # 2 valid, '.' blanks
    "",                                     # 3 blank: skipped
    EASY[:80],                              # 4 wrong length
    HARD17 + "   # Royle 17-clue #1",       # 5 valid, trailing text after whitespace
    EASY[:40] + "x" + EASY[41:],            # 6 bad character
    _duplicate_row(EASY),                   # 7 duplicate given
    "   ",                                  # 8 whitespace only: skipped
    EASY + "0",                             # 9 wrong length (82)
]
EXPECTED = [  # (line, normalised puzzle or None, error fragment or None) per non-empty line
    (1, EASY, None),
    (2, HARD17, None),
    (4, None, "81 cells, got 80"),
    (5, HARD17, None),
    (6, None, "invalid character 'x' at cell 40"),
    (7, None, "duplicate digit 3 in row 1"),
    (9, None, "81 cells, got 82"),
]
VALID_KEYS = {"puzzle", "solution", "steps", "tokens_per_forward"}


def _check_valid_record(rec: dict, puzzle: str) -> None:
    assert set(rec) == VALID_KEYS, rec
    assert rec["puzzle"] == puzzle and len(rec["puzzle"]) == 81 and set(rec["puzzle"]) <= set("0123456789")
    assert isinstance(rec["solution"], str)
    assert rec["solution"] == "" or (len(rec["solution"]) == 81 and rec["solution"].isdigit())
    assert isinstance(rec["steps"], int) and not isinstance(rec["steps"], bool)
    assert 1 <= rec["steps"] <= MAX_STEPS
    assert isinstance(rec["tokens_per_forward"], float) and rec["tokens_per_forward"] >= 0


def _check_json_stdout(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert len(lines) == len(EXPECTED), stdout
    recs = [json.loads(line) for line in lines]
    for rec, (n, puzzle, error) in zip(recs, EXPECTED):
        assert isinstance(rec, dict)
        if error is None:
            _check_valid_record(rec, puzzle)
        else:
            assert set(rec) == {"line", "error"}, rec
            assert rec["line"] == n
            assert error in rec["error"], (n, rec["error"])
    return recs


@pytest.fixture(scope="module")
def puzzle_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("sudoku_file") / "puzzles.txt"
    f.write_text("\n".join(FILE_LINES) + "\n", encoding="utf-8")
    return f


# -- read_puzzle_file -----------------------------------------------------------------------------------------------
def test_read_puzzle_file_rows(puzzle_file):
    rows = sudoku_run.read_puzzle_file(puzzle_file)
    assert [(n, p) for n, p, _ in rows] == [(n, p) for n, p, _ in EXPECTED]
    for (_, p, err), (_, _, want) in zip(rows, EXPECTED):
        assert (err is None) == (want is None)
        if want is not None:
            assert p is None and want in err


# -- CLI: solve -----------------------------------------------------------------------------------------------------
def test_cli_solve_json_contract(model_dir, model, puzzle_file):
    proc = ok(run_cli("sudoku", "solve", "--file", puzzle_file, "--json", "--model", model_dir))
    recs = _check_json_stdout(proc.stdout)
    # The valid lines are solved as one batch with seed 0: the same as the Python API in this process.
    valid = [p for _, p, e in EXPECTED if e is None]
    want = sudoku_run.solve_batch(model, valid, seed=0)
    assert [r for r in recs if "error" not in r] == want


def test_cli_solve_only_errors_and_empty_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("123\n\n" + "x" * 81 + "\n", encoding="utf-8")
    assert cli_main(["sudoku", "solve", "--file", str(bad), "--json", "--model", str(model_dir)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in recs] == [1, 3]
    assert "got 3" in recs[0]["error"] and "invalid character 'x'" in recs[1]["error"]
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert cli_main(["sudoku", "solve", "--file", str(empty), "--json", "--model", str(model_dir)]) == 0
    assert capsys.readouterr().out == ""


def test_cli_solve_missing_file(model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert cli_main(["sudoku", "solve", "--file", str(missing), "--json", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error") and "nope.txt" in err
    assert "Traceback" not in err


def test_cli_solve_no_model_without_bundle(puzzle_file, tmp_path, monkeypatch, capsys):
    """Whatever is installed: with no bundled model, omitting --model is a clear usage error."""
    monkeypatch.setattr(sudoku_run, "BUNDLED", tmp_path / "no-bundle")
    assert cli_main(["sudoku", "solve", "--file", str(puzzle_file), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error") and "--model" in err
    assert cli_main(["sudoku", "eval", "--n", "1"]) == 2
    assert "--model" in capsys.readouterr().err


def test_cli_solve_default_model(puzzle_file):
    """The installed package as shipped: an error naming --model, or (once bundled) the default model answers."""
    proc = run_cli("sudoku", "solve", "--file", puzzle_file, "--json")
    if not (sudoku_run.BUNDLED / "config.json").is_file():
        assert proc.returncode == 2, proc.stderr
        assert "dgemma: error" in proc.stderr and "--model" in proc.stderr
        assert proc.stdout == ""
    else:
        ok(proc)
        _check_json_stdout(proc.stdout)


# -- solve_batch ----------------------------------------------------------------------------------------------------
def test_solve_batch_order_and_contract(model, puzzles):
    res = sudoku_run.solve_batch(model, puzzles, seed=3, batch_size=4)
    assert len(res) == len(puzzles)
    for r, p in zip(res, puzzles):
        _check_valid_record(r, p)
    assert sudoku_run.solve_batch(model, [], seed=3) == []


def test_solve_batch_deterministic_and_batch_independent(model, puzzles):
    a = sudoku_run.solve_batch(model, puzzles, seed=11, batch_size=4)
    assert sudoku_run.solve_batch(model, puzzles, seed=11, batch_size=4) == a
    # Row i is seeded with seed + i whatever the chunking (chunk start + row in chunk).
    assert sudoku_run.solve_batch(model, puzzles, seed=11, batch_size=1) == a
    assert sudoku_run.solve_batch(model, puzzles, seed=11, batch_size=3) == a
    solo = [sudoku_run.solve_batch(model, [p], seed=11 + i)[0] for i, p in enumerate(puzzles)]
    assert solo == a


def test_solve_batch_seed_matters(model, puzzles):
    a = sudoku_run.solve_batch(model, puzzles[:2], seed=0)
    b = sudoku_run.solve_batch(model, puzzles[:2], seed=1000)
    c = sudoku_run.solve_batch(model, puzzles[:2], seed=0, max_denoising_steps=3)
    assert [r["puzzle"] for r in b] == [r["puzzle"] for r in c] == puzzles[:2]
    # Different seeds draw different canvases (for a random model tokens/forward shows it); overrides reach stream.
    assert a != b
    assert all(1 <= r["steps"] <= 3 for r in c)


def test_solve_batch_on_event(model, puzzles):
    seen = []
    sudoku_run.solve_batch(model, puzzles[:2], seed=0, max_denoising_steps=2,
                           on_event=lambda ev, chunk: seen.append((type(ev).__name__, tuple(chunk))))
    names = [n for n, _ in seen]
    assert names[-1] == "Done" and "Draft" in names and "Commit" in names
    assert all(chunk == tuple(puzzles[:2]) for _, chunk in seen)


class _StubModel:
    """Stands in for a model that answers: records each `stream` call and returns canned texts."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts, self.calls = tokenizer, list(texts), []
        self.config = type("Cfg", (), {"canvas_length": 82})()
        self.source = "stub"

    def stream(self, prompts, *, max_new_tokens=None, seed=None, **overrides):
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "seed": seed, **overrides})
        results = []
        for k in range(len(prompts)):
            text = self.texts.pop(0)
            results.append(dgemma.GenerationResult([], 27.0 + k, [3 + k, 9], seed + k, "eos", {}, text))
        yield dgemma.Done(results)


def test_solve_batch_glue_with_stub(model, puzzles):
    """Prompts, seeds per chunk, canvas-sized max_new_tokens, overrides, answer parsing, first-canvas steps."""
    spaced = " ".join(EASY_SOLUTION[:40]) + "\n" + EASY_SOLUTION[40:] + "<end_of_turn>"
    texts = [spaced, "12345", None, EASY_SOLUTION + "999"]
    stub = _StubModel(model.tokenizer, texts)
    res = sudoku_run.solve_batch(stub, puzzles, seed=5, batch_size=3, entropy_bound=0.5)
    assert [c["seed"] for c in stub.calls] == [5, 8]
    assert all(c["max_new_tokens"] == 82 and c["entropy_bound"] == 0.5 for c in stub.calls)
    want_prompts = [model.tokenizer.encode(sudoku.prompt_text(p)) for p in puzzles]
    assert stub.calls[0]["prompts"] + stub.calls[1]["prompts"] == want_prompts
    assert [r["puzzle"] for r in res] == puzzles
    assert [r["solution"] for r in res] == [EASY_SOLUTION, "", "", EASY_SOLUTION]
    assert [r["steps"] for r in res] == [3, 4, 5, 3]
    assert [r["tokens_per_forward"] for r in res] == [27.0, 28.0, 29.0, 27.0]


# -- evaluate / score ------------------------------------------------------------------------------------------------
SCORE_KEYS = {"solve_rate", "cell_accuracy", "givens_kept", "mean_steps", "tokens_per_forward", "count"}


def _check_stats(s: dict, n: int, max_steps: int) -> None:
    assert SCORE_KEYS <= set(s)
    assert s["count"] == n
    for k in ("solve_rate", "cell_accuracy", "givens_kept"):
        assert 0.0 <= s[k] <= 1.0, (k, s[k])
    assert 1 <= s["mean_steps"] <= max_steps
    assert s["tokens_per_forward"] >= 0


def test_evaluate_structure(model):
    n = 6
    out = sudoku_run.evaluate(model, n=n, step_caps=(2,))
    assert out["n"] == n and out["blanks"] == [30, 50] and isinstance(out["seed"], int)
    d = out["default"]
    _check_stats(d, n, MAX_STEPS)
    assert d["seconds"] >= 0
    buckets = d["buckets"]
    assert buckets and set(buckets) <= {"30-34", "35-39", "40-44", "45-50"}
    assert sum(b["count"] for b in buckets.values()) == n
    for b in buckets.values():
        _check_stats(b, b["count"], MAX_STEPS)
    # The buckets hold exactly the held-out puzzles' blank counts.
    pairs = sudoku.generate_many(n, seed=out["seed"], blanks=(30, 50))
    counts: dict[str, int] = {}
    for p, _ in pairs:
        k = sudoku.bucket(sudoku.blank_count(p))
        counts[k] = counts.get(k, 0) + 1
    assert {k: b["count"] for k, b in buckets.items()} == counts
    assert set(out["step_caps"]) == {"2"}
    capped = out["step_caps"]["2"]
    _check_stats(capped, n, 2)
    assert capped["mean_steps"] <= 2
    assert sum(b["count"] for b in capped["buckets"].values()) == n
    json.dumps(out)  # serialisable as is


def test_score_hand_made():
    p, s = EASY, EASY_SOLUTION
    blanks = [i for i, ch in enumerate(p) if ch == "0"]
    # Swap two blank cells of row 1 holding different digits: rows stay permutations, columns break.
    i, j = blanks[0], blanks[1]
    assert i // 9 == j // 9 and s[i] != s[j]
    wrong = list(s)
    wrong[i], wrong[j] = wrong[j], wrong[i]
    wrong = "".join(wrong)
    right = {"solution": s, "steps": 4, "tokens_per_forward": 20.5}
    bad = {"solution": wrong, "steps": 6, "tokens_per_forward": 13.5}
    empty = {"solution": "", "steps": 48, "tokens_per_forward": 1.0}

    one = sudoku_run.score([(p, s)], [right])
    assert one["solve_rate"] == 1.0 and one["cell_accuracy"] == 1.0 and one["givens_kept"] == 1.0
    assert one["count"] == 1 and one["mean_steps"] == 4 and one["tokens_per_forward"] == 20.5

    w = sudoku_run.score([(p, s)], [bad])
    assert w["solve_rate"] == 0.0 and w["givens_kept"] == 1.0
    assert w["cell_accuracy"] == pytest.approx((len(blanks) - 2) / len(blanks))

    e = sudoku_run.score([(p, s)], [empty])
    assert e["solve_rate"] == 0.0 and e["cell_accuracy"] == 0.0 and e["givens_kept"] == 0.0

    mixed = sudoku_run.score([(p, s)] * 3, [right, bad, empty])
    assert mixed["count"] == 3
    assert mixed["solve_rate"] == pytest.approx(1 / 3)
    assert mixed["cell_accuracy"] == pytest.approx((2 * len(blanks) - 2) / (3 * len(blanks)))
    assert mixed["givens_kept"] == pytest.approx(2 / 3)
    assert mixed["mean_steps"] == pytest.approx((4 + 6 + 48) / 3)
    assert mixed["tokens_per_forward"] == pytest.approx((20.5 + 13.5 + 1.0) / 3)

    none = sudoku_run.score([], [])
    assert none["count"] == 0 and none["solve_rate"] == 0.0


# -- CLI: eval ------------------------------------------------------------------------------------------------------
def test_cli_eval_writes_json(model_dir, tmp_path):
    out = tmp_path / "eval.json"
    proc = ok(run_cli("sudoku", "eval", "--model", model_dir, "--n", "4", "--step-caps", "2", "--out", out))
    assert "solve rate" in proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["n"] == 4 and result["model"] == str(model_dir) and result["seed"] == 424242
    _check_stats(result["default"], 4, MAX_STEPS)
    assert sum(b["count"] for b in result["default"]["buckets"].values()) == 4
    assert set(result["step_caps"]) == {"2"} and result["step_caps"]["2"]["mean_steps"] <= 2


def test_cli_solve_file_is_a_directory(model_dir, tmp_path, capsys):
    assert cli_main(["sudoku", "solve", "--file", str(tmp_path), "--json", "--model", str(model_dir)]) == 2
    assert capsys.readouterr().err.startswith("dgemma: error")


# -- other grid sizes -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model6_dir(tmp_path_factory) -> Path:
    """A random 6x6 model: canvas 37 (36 digits + end token) and a task.json naming the grid."""
    out = tmp_path_factory.mktemp("sudoku_model6") / "tiny37"
    write_random_checkpoint(out, "tiny", seed=1, canvas_length=37)
    (out / "task.json").write_text(json.dumps(sudoku.task_info(6)), encoding="utf-8")
    return out


def test_task_spec(model, model6_dir):
    assert sudoku_run.task_spec(model) == sudoku_run.TaskSpec(9, sudoku.task_info(9)["prompt_template"])
    m6 = dgemma.load_model(model6_dir)
    spec = sudoku_run.task_spec(m6)
    p = sudoku.generate_many(1, seed=1, size=6)[0][0]
    assert spec.size == 6 and spec.prompt(p) == sudoku.prompt_text(p)
    with pytest.raises(ValueError, match="36 cells"):
        spec.prompt(EASY)
    # A model is prompted the way its task.json says: the bundled 9x9 model with the current prompt, a model trained
    # with the first recipe's prompt (the instruction line) with that one.
    bundled = sudoku_run.task_spec(dgemma.load_model(sudoku_run.BUNDLED))
    assert bundled.size == 9 and bundled.prompt(EASY) == sudoku.prompt_text(EASY)
    legacy_dir = model6_dir.parent / "legacy81"
    write_random_checkpoint(legacy_dir, "tiny", seed=1, canvas_length=82)
    template = sudoku.task_info(9)["prompt_template"]
    info = dict(sudoku.task_info(9), prompt_template=sudoku.PROMPT + "\n" + template)
    (legacy_dir / "task.json").write_text(json.dumps(info), encoding="utf-8")
    legacy = sudoku_run.task_spec(dgemma.load_model(legacy_dir))
    assert legacy.size == 9 and legacy.prompt(EASY) == sudoku.legacy_prompt_text(EASY)


def test_bad_task_file(tmp_path, model6_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model6_dir, broken)
    (broken / "task.json").write_text('{"task": "sudoku", "size": 7, "prompt_template": "{puzzle}"}')
    with pytest.raises(ValueError, match="task.json: not a valid Sudoku task file"):
        sudoku_run.task_spec(dgemma.load_model(broken))


def test_cli_solve_6x6_with_one_model(model6_dir, tmp_path):
    """With --model, puzzles of another size are per-line errors; 6x6 answers are 36 digits."""
    six = [p for p, _ in sudoku.generate_many(2, seed=8, size=6)]
    f = tmp_path / "mixed.txt"
    f.write_text(f"{six[0]}\n{EASY}\n{six[1].replace('0', '.')}\n", encoding="utf-8")
    proc = ok(run_cli("sudoku", "solve", "--file", f, "--json", "--model", model6_dir))
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(recs) == 3 and set(recs[1]) == {"line", "error"} and recs[1]["line"] == 2
    assert "6x6" in recs[1]["error"] and "got 81 cells" in recs[1]["error"]
    for rec, p in zip((recs[0], recs[2]), six):
        assert set(rec) == VALID_KEYS and rec["puzzle"] == p
        assert rec["solution"] == "" or (len(rec["solution"]) == 36 and rec["solution"].isdigit())
        assert 1 <= rec["steps"] <= MAX_STEPS
    m6 = dgemma.load_model(model6_dir)
    assert [r for r in recs if "error" not in r] == sudoku_run.solve_batch(m6, six, seed=0)


def test_evaluate_6x6_buckets(model6_dir):
    out = sudoku_run.evaluate(dgemma.load_model(model6_dir), n=4, step_caps=())
    assert out["size"] == 6 and out["blanks"] == list(sudoku.default_blanks(6))
    edges = sudoku.bucket_edges(6)
    assert set(out["default"]["buckets"]) <= {sudoku.bucket(b, edges) for b in range(edges[0], edges[-1] + 1)}
    assert sum(b["count"] for b in out["default"]["buckets"].values()) == 4


def test_sudoku_verifier_rules(model):
    """Rejects exactly: a repeated digit in a row, column or box (never a kept given), a changed given, a non-digit
    cell; a correct solution passes whole, and positions not handed in are neither judged nor counted."""
    pairs = sudoku.generate_many(2, seed=11, blanks=(30, 30))
    verify = sudoku_run.sudoku_verifier(model, [p for p, _ in pairs])
    tok = model.tokenizer
    sol = torch.tensor([tok.encode(s) + [1] for _, s in pairs])
    everywhere = torch.ones_like(sol, dtype=torch.bool)
    assert not verify(sol, everywhere).any()
    puzzle = pairs[0][0]
    blank = puzzle.index("0")
    row = blank // 9
    given = next(i for i in range(row * 9, row * 9 + 9) if puzzle[i] != "0")
    bad = sol.clone()
    bad[0, blank] = sol[0, given]  # the given's digit again in its row
    reject = verify(bad, everywhere)
    assert reject[0, blank] and not reject[0, given] and reject[0].sum() >= 1 and not reject[1].any()
    changed = sol.clone()
    changed[0, given] = sol[0, blank]  # a given overwritten
    assert verify(changed, everywhere)[0, given]
    letter = sol.clone()
    letter[1, 5] = tok.encode("x")[0]
    assert verify(letter, everywhere)[1, 5]
    only_blank = torch.zeros_like(everywhere)
    only_blank[0, blank] = True  # the other positions are noise: not counted
    assert not verify(sol, only_blank).any() and verify(bad, only_blank)[0, blank]


def test_cli_solve_verify_keeps_the_json_contract(model_dir, puzzle_file):
    proc = ok(run_cli("sudoku", "solve", "--file", puzzle_file, "--json", "--verify", "--model", model_dir))
    recs = _check_json_stdout(proc.stdout)
    assert {tuple(sorted(r)) for r in recs if "error" not in r} == {("puzzle", "solution", "steps",
                                                                      "tokens_per_forward")}
