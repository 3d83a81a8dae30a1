"""scripts/eval_sudoku.py end to end on a few puzzles: the JSON rows it writes, keeping rows across --parts runs,
and the README table it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dgemma.tasks.sudoku_run import default_model_path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_sudoku.py"


def run(*args: str) -> str:
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_eval_script_rows_merge_and_table(tmp_path):
    out = tmp_path / "results.json"
    common = ["--n", "3", "--seed", "5", "--caps", "2,4", "--threads", "1", "--out", str(out)]
    run(*common, "--parts", "diffusion,base")
    r = json.loads(out.read_text())
    assert r["n"] == 3 and set(r) >= {"diffusion", "base", "commands"}
    assert sorted(r["diffusion"]["step_caps"]) == ["2", "4"]
    assert r["diffusion"]["step_caps"]["2"]["mean_steps"] <= 2
    assert r["diffusion"]["default"]["givens_kept"] == 1.0
    # a later run with other --parts keeps the rows it does not recompute
    table = run(*common, "--parts", "autoregressive", "--ar", str(default_model_path()), "--markdown")
    r2 = json.loads(out.read_text())
    assert r2["diffusion"] == r["diffusion"] and r2["base"] == r["base"]
    ar = r2["autoregressive"]["default"]
    assert ar["tokens_per_forward"] == 1.0  # one token per pass, left to right
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | decoding |")
    assert sum("bundled (SFT)" in ln for ln in lines) == 3  # caps 2 and 4, then the default cap
    assert lines[-1].startswith("| autoregressive baseline | left to right |")
    # printing alone recomputes nothing and leaves the file as it was
    before = out.read_text()
    assert run("--out", str(out), "--parts", "", "--markdown") == table
    assert out.read_text() == before
