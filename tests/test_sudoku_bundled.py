"""The bundled Sudoku model: what ships, how well it solves, and that the reference implementation runs it too."""

from __future__ import annotations

import json

import pytest
import torch
from refmodels import ref_generate
from transformers import DiffusionGemmaForBlockDiffusion

from dgemma.checkpoint import load_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import BUNDLED, evaluate

# A regression guard on 50 held-out puzzles (seed 777), a little under what the bundled model measured when it was
# bundled (50.0% of blank cells right, 0 of 50 solved; README, Sudoku). The project's target, >= 85% of these
# puzzles solved, needs a better-trained model; when one is bundled this becomes a solve-rate floor.
CELL_FLOOR = 0.45


@pytest.fixture(scope="module")
def model():
    return load_model(BUNDLED)


def test_bundle_layout():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "task.json", "train_log.jsonl", "TRAINING.md"} <= names
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size < 25 * 2**20, f"bundle is {size / 2**20:.1f} MiB"
    cfg = json.loads((BUNDLED / "config.json").read_text())["text_config"]
    assert cfg["num_experts"] > 1 and cfg["top_k_experts"] >= 1
    assert {"sliding_attention", "full_attention"} <= set(cfg["layer_types"])
    assert json.loads((BUNDLED / "task.json").read_text()) == sudoku.task_info()
    log = [json.loads(line) for line in (BUNDLED / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] < log[-1]["step"] and log[-1]["loss"] < log[0]["loss"]


def test_fast_sampler_solves_like_the_reference_sampler(model):
    """The default sampler (one uniform per position, inverse CDF) against the reference's own draws on the same 50
    puzzles: same quality and same number of denoising steps, up to sampling noise (measured: 54.6% vs 54.0% of
    blank cells, 25.7 vs 24.3 steps; the noise of each difference is about a third of the tolerance)."""
    fast = evaluate(model, n=50, seed=778)["default"]
    ref = evaluate(model, n=50, seed=778, rng="reference")["default"]
    assert fast["givens_kept"] == ref["givens_kept"] == 1.0
    assert abs(fast["cell_accuracy"] - ref["cell_accuracy"]) < 0.06, (fast, ref)
    assert abs(fast["solve_rate"] - ref["solve_rate"]) <= 0.1, (fast, ref)
    assert abs(fast["mean_steps"] - ref["mean_steps"]) < 4, (fast, ref)


def test_bundled_model_quality(model):
    r = evaluate(model, n=50, seed=777)["default"]
    assert r["givens_kept"] == 1.0
    assert r["cell_accuracy"] >= CELL_FLOOR, r


def test_reference_implementation_runs_the_bundle(model):
    """Proof that the bundle is a genuine DiffusionGemma checkpoint: transformers loads it and, with the same seed,
    writes exactly the tokens dgemma writes in rng="reference" mode, so it solves exactly what dgemma solves."""
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    for i, (puzzle, solution) in enumerate(sudoku.generate_many(3, seed=31337, blanks=(30, 40))):
        ids = model.tokenizer.encode(sudoku.prompt_text(puzzle))
        rows, tpf, _ = ref_generate(ref, torch.tensor([ids]), max_new_tokens=82, seed=i)
        ours = model.generate(ids, max_new_tokens=82, seed=i, rng="reference")
        assert rows[0] == ours.ids and tpf[0] == ours.tokens_per_forward
        answer = sudoku.parse_answer(model.tokenizer.decode(rows[0]))
        assert sudoku.check(puzzle, answer, solution)["givens_kept"]


def test_solve_command_uses_the_bundle(tmp_path):
    import subprocess
    import sys

    puzzles = [p for p, _ in sudoku.generate_many(2, seed=99, blanks=(30, 35))]
    f = tmp_path / "p.txt"
    f.write_text(f"{puzzles[0]}\nnot a puzzle\n{puzzles[1].replace('0', '.')}  # a comment\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "dgemma.cli", "sudoku", "solve", "--file", str(f), "--json"],
                       capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 3 and "error" in rows[1] and rows[1]["line"] == 2
    for row, p in zip((rows[0], rows[2]), puzzles):
        assert row["puzzle"] == p and len(row["solution"]) == 81 and row["solution"].isdigit()
        assert 1 <= row["steps"] <= 48 and row["tokens_per_forward"] > 0
        assert sudoku.check(p, row["solution"])["givens_kept"]
