"""Constrained decoding on the bundled Sudoku models: solve rate and steps, unconstrained vs a digits-only regex vs
the givens clamped as an infill template (each blank a one-token hole of digits), on the same held-out puzzles
(`dgemma sudoku eval`'s seed range) with the same seeds.

    python benchmarks/sudoku_constrained.py --size 6 --n 1000 --out benchmarks/results/sudoku6-constrained.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dgemma.checkpoint.load import load_model
from dgemma.constraints import Constraint, Hole, Template
from dgemma.hardware import cpu_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import _score, default_model_path, solve_batch


def infill(puzzle: str, n: int) -> Constraint:
    """Givens as fixed text, each blank a one-token hole of the digits 1..n."""
    parts: list[str | Hole] = []
    for ch in puzzle:
        if ch == "0":
            parts.append(Hole(1, 1, f"[1-{n}]"))
        elif parts and isinstance(parts[-1], str):
            parts[-1] += ch
        else:
            parts.append(ch)
    return Constraint.infill(Template(tuple(parts)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=6, choices=(6, 9))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=424242)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(default_model_path(args.size))
    n = args.size
    pairs = sudoku.generate_many(args.n, seed=args.seed, blanks=sudoku.default_blanks(n), size=n)
    puzzles = [p for p, _ in pairs]
    modes = {
        "unconstrained": lambda: None,
        "digits": lambda: [Constraint.regex(f"[1-{n}]{{{n * n}}}")] * len(puzzles),
        "givens_clamped": lambda: [infill(p, n) for p in puzzles],
    }
    out = {"model": str(default_model_path(args.size)), "size": n, "n": args.n, "seed": args.seed,
           "cpu": cpu_model(), "threads": torch.get_num_threads(), "modes": {}}
    for name, make in modes.items():
        constraints = make()
        t0 = time.perf_counter()
        res = []
        for i in range(0, len(puzzles), args.batch_size):
            chunk = puzzles[i:i + args.batch_size]
            extra = {} if constraints is None else {"constraint": constraints[i:i + args.batch_size]}
            res += solve_batch(model, chunk, seed=i, batch_size=len(chunk), **extra)
        stats = _score(pairs, res)
        stats["seconds"] = time.perf_counter() - t0
        stats["well_formed"] = sum(len(r["solution"]) == n * n for r in res) / len(res)
        out["modes"][name] = stats
        print(f"{name}: solved {stats['solve_rate']:.1%}, cells {stats['cell_accuracy']:.1%}, givens kept "
              f"{stats['givens_kept']:.1%}, well-formed {stats['well_formed']:.1%}, steps {stats['mean_steps']:.2f}, "
              f"{stats['seconds']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
