"""The bundled Sudoku models (6x6 and 9x9): what ships, how well they solve, and that the reference implementation
runs them too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from refmodels import ref_generate
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma.checkpoint.load import load_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import BUNDLED_MODELS, evaluate, task_spec

# Regression floors, under what each model measured when it was bundled (seed 777; README, Sudoku) with room for
# other CPUs' rounding. 6x6 (100 puzzles): 97% solved, 98.1% of blank cells, 3.7 steps for 16.6 blanks; the solve
# floor is the project's CI target (solves >= 90% of 100 held-out puzzles). 9x9 (these 50 puzzles): 94% solved,
# 98.5% of blank cells, 6.2 steps (stage 5, bf16 weights; 86.0% of 1000 held-out puzzles; the stage-4 step-3500
# model had 80% / 94.9% here, stage 2 2% / 63.1%).
SOLVE_FLOOR_6 = 0.90
CELL_FLOOR_6 = 0.96
CELL_FLOOR_9 = 0.94
SOLVE_FLOOR_9 = 0.76  # about 2 standard errors (on 50) under the held-out 86%; 12 misses where 3 are measured
# The model alone (no --verify) may change a given; the stage-5 model kept every one here and in the 1000 held-out
# puzzles (the step-3500 one changed position 18 of puzzle 33); more than one would be a regression.
GIVENS_FLOOR_9 = 0.98
SAMPLER_SOLVE_FLOOR = 0.85  # both samplers on the 6x6 sampler-test puzzles (seed 778): 98.3% and 96.7% when bundled


@pytest.fixture(scope="module")
def model6():
    return load_model(BUNDLED_MODELS[6])


@pytest.fixture(scope="module")
def model9():
    return load_model(BUNDLED_MODELS[9])


@pytest.mark.parametrize("size", [6, 9])
def test_bundle_layout(size):
    path = BUNDLED_MODELS[size]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "task.json", "train_log.jsonl", "TRAINING.md"} <= names
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total < 25 * 2**20, f"bundle is {total / 2**20:.1f} MiB"
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    assert text["num_experts"] > 1 and text["top_k_experts"] >= 1
    assert {"sliding_attention", "full_attention"} <= set(text["layer_types"])
    assert cfg["canvas_length"] == size * size + 1  # the digits and the end token
    info = json.loads((path / "task.json").read_text())
    expected = sudoku.task_info(size)
    assert {k: info[k] for k in ("task", "size", "box_rows", "box_cols")} == \
        {k: expected[k] for k in ("task", "size", "box_rows", "box_cols")}
    log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] < log[-1]["step"] and log[-1]["loss"] < log[0]["loss"]


def test_6x6_model_quality(model6):
    """100 held-out puzzles: every given kept, solve rate and blank cells above their floors, and fewer denoising
    steps than half the blanks (the showcase's claim about speed)."""
    r = evaluate(model6, n=100, seed=777)["default"]
    assert r["givens_kept"] == 1.0, r
    assert r["solve_rate"] >= SOLVE_FLOOR_6, r
    assert r["cell_accuracy"] >= CELL_FLOOR_6, r
    assert r["mean_steps"] < r["mean_blanks"] / 2, r


def test_6x6_fast_sampler_like_the_reference_sampler(model6):
    """The default sampler (one uniform per position, inverse CDF) against the reference's own draws on the same 60
    puzzles: both solve a good share of them (so the comparison can fail), and they agree on the solve rate, the
    blank cells and the steps up to sampling noise (standard errors of the differences: about 0.09 for the solve
    rate and 0.02 for cell accuracy; the tolerances are 3-4 of them)."""
    fast = evaluate(model6, n=60, seed=778)["default"]
    ref = evaluate(model6, n=60, seed=778, rng="reference")["default"]
    assert fast["givens_kept"] == ref["givens_kept"] == 1.0
    assert min(fast["solve_rate"], ref["solve_rate"]) >= SAMPLER_SOLVE_FLOOR, (fast, ref)
    assert abs(fast["solve_rate"] - ref["solve_rate"]) <= 0.3, (fast, ref)
    assert abs(fast["cell_accuracy"] - ref["cell_accuracy"]) < 0.08, (fast, ref)
    assert abs(fast["mean_steps"] - ref["mean_steps"]) < 3, (fast, ref)


def test_9x9_model_quality(model9):
    r = evaluate(model9, n=50, seed=777)["default"]
    assert r["givens_kept"] >= GIVENS_FLOOR_9, r
    assert r["cell_accuracy"] >= CELL_FLOOR_9, r
    assert r["solve_rate"] >= SOLVE_FLOOR_9, r


@pytest.mark.parametrize("size", [6, 9])
def test_reference_implementation_runs_the_bundle(size):
    """Proof that each bundle is a genuine DiffusionGemma checkpoint: transformers loads it and, with the same seed,
    writes exactly the tokens dgemma writes in rng="reference" mode, so it solves exactly what dgemma solves. Both
    compute in fp32 (a bf16 run and an fp32 run of the same weights may stop at different steps near a tie)."""
    model = load_model(BUNDLED_MODELS[size], dtype="float32")
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(BUNDLED_MODELS[size], dtype=torch.float32).eval()
    spec, canvas = task_spec(model), model.config.canvas_length
    for i, (puzzle, solution) in enumerate(sudoku.generate_many(2, seed=31337, size=size)):
        ids = model.tokenizer.encode(spec.prompt(puzzle))
        rows, tpf, _ = ref_generate(ref, torch.tensor([ids]), max_new_tokens=canvas, seed=i)
        ours = model.generate(ids, max_new_tokens=canvas, seed=i, rng="reference")
        assert rows[0] == ours.ids and tpf[0] == ours.tokens_per_forward
        answer = sudoku.parse_answer(model.tokenizer.decode(rows[0]), size)
        assert sudoku.check(puzzle, answer, solution)["givens_kept"]


def test_solve_command_picks_the_model_by_size(tmp_path):
    """The contract: one JSON object per line, the bundled model for each puzzle's size, errors per line."""
    nine = [p for p, _ in sudoku.generate_many(2, seed=99, blanks=(30, 35))]
    six = [p for p, _ in sudoku.generate_many(2, seed=99, size=6)]
    f = tmp_path / "p.txt"
    f.write_text(f"{nine[0]}\nnot a puzzle\n{six[0]}\n{nine[1].replace('0', '.')}  # a comment\n"
                 f"{six[1].replace('0', '.')}\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "sudoku", "solve", "--file", str(f), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 5 and rows[1] == {"line": 2, "error": rows[1]["error"]} and "cells" in rows[1]["error"]
    for row, p in zip((rows[0], rows[3], rows[2], rows[4]), nine + six):
        assert set(row) == {"puzzle", "solution", "steps", "tokens_per_forward"}
        assert row["puzzle"] == p and len(row["solution"]) == len(p) and row["solution"].isdigit()
        assert row["steps"] >= 1 and row["tokens_per_forward"] > 0
        assert sudoku.check(p, row["solution"])["givens_kept"]


@pytest.mark.parametrize("flags", [["--no-animation"], []])
def test_demo_command(flags):
    """`dgemma sudoku demo` (the README's first command) shows both puzzles, answers and step counts, animated
    (the live grid) or not."""
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "sudoku", "demo", *flags],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "6x6 puzzle" in out and "9x9 puzzle" in out and out.count("denoising steps") == 2
    assert out.count("blanks right in") == 2 and out.count("answer:") == 2
