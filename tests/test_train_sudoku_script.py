"""scripts/train_sudoku.py end to end on a 4x4 run of a few steps: base, data, snapshots, resume, and a bundle whose
TRAINING.md says how it was made and which `dgemma sudoku` loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dgemma.checkpoint.load import load_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import solve_batch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_sudoku.py"
ARGS = ["--size", "4", "--batch-size", "4", "--puzzles", "24", "--blanks", "5,8", "--ar-targets", "none",
        "--threads", "1", "--save-every", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "3"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_train_resume_and_bundle(tmp_path):
    out, dest = tmp_path / "run", tmp_path / "bundle"
    p = run("--out", str(out), "--steps", "2", *ARGS)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for r in rows:  # the --blanks range reached the generator
        assert 5 <= r["prompt"].splitlines()[-1].count("0") <= 8
    p = run("--out", str(out), "--steps", "4", "--resume", "--bundle", str(dest), *ARGS)
    assert p.returncode == 0, p.stderr
    log = [json.loads(x) for x in (dest / "train_log.jsonl").read_text().splitlines() if x.strip()]
    assert log[-1]["step"] == 4 and log[-1]["examples"] == 16
    assert json.loads((dest / "task.json").read_text())["size"] == 4
    text = (dest / "TRAINING.md").read_text()
    assert "--resume --bundle" in text and "blanks=(5, 8)" in text and "no next-token loss" in text
    puzzle = sudoku.generate_many(1, seed=9, size=4)[0][0]
    [res] = solve_batch(load_model(dest), [puzzle])  # task.json: the 4x4 grid and prompt
    assert res["puzzle"] == puzzle and 1 <= res["steps"] <= 16


def test_bad_arguments_are_refused(tmp_path):
    p = run("--out", str(tmp_path / "r"), "--steps", "1", "--size", "4", "--blanks", "9,3")
    assert p.returncode == 2 and "--blanks needs 0 <= LO <= HI" in p.stderr
    p = run("--out", str(tmp_path / "r"), "--steps", "1", "--size", "4", "--data-workers", "0")
    assert p.returncode == 2 and "--data-workers needs at least 1" in p.stderr
    assert not (tmp_path / "r").exists()
