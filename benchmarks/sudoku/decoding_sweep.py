"""Decoding-settings sweep for a bundled Sudoku model: solve rate, blank cells, steps and tokens per forward pass
for each named set of generation overrides, on the same puzzles and seeds.

    python benchmarks/sudoku/decoding_sweep.py --size 6 --n 500 --settings SETTINGS.json --out OUT.jsonl
    python benchmarks/sudoku/decoding_sweep.py --size 6 --n 1000 --seed 424242 --held-out --settings ... --out ...

SETTINGS.json: a list of [name, {generation setting: value}] ([["baseline", {}], ["hot", {"t_max": 1.5}]]).
Choose on development puzzles (seed 777, the default); `--held-out` is required to use the held-out seed 424242,
which is for checking a choice once. One JSON line per setting is appended to OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dgemma.checkpoint.load import load_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import default_model_path, score, solve_batch

HELD_OUT = 424242


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, required=True, choices=[6, 9])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--held-out", action="store_true", help=f"allow the held-out seed {HELD_OUT}")
    ap.add_argument("--settings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--solve-seed", type=int, default=0)
    args = ap.parse_args()
    if args.seed == HELD_OUT and not args.held_out:
        ap.error(f"seed {HELD_OUT} is the held-out set: pass --held-out to check a choice made elsewhere")
    torch.set_num_threads(1)
    pairs = sudoku.generate_many(args.n, seed=args.seed, blanks=(12, 24) if args.size == 6 else (30, 50),
                                 size=args.size)
    model = load_model(default_model_path(args.size), device="cpu")
    settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    with open(args.out, "a", encoding="utf-8") as out:
        for name, overrides in settings:
            t = time.time()
            res = solve_batch(model, [p for p, _ in pairs], seed=args.solve_seed, batch_size=args.batch, **overrides)
            stats = score(pairs, res)
            rate, n = stats["solve_rate"], stats["count"]
            rec = {"name": name, "overrides": overrides, "size": args.size, "n": n, "seed": args.seed,
                   "solve_seed": args.solve_seed, "solved": rate, "se": math.sqrt(rate * (1 - rate) / n),
                   "cells": stats["cell_accuracy"], "mean_steps": stats["mean_steps"],
                   "tpf": stats["tokens_per_forward"], "seconds": time.time() - t}
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"{name:32s} solved {100 * rate:5.1f}% ±{100 * rec['se']:.1f}  cells {100 * rec['cells']:5.1f}%  "
                  f"steps {rec['mean_steps']:5.2f}  tokens/forward {rec['tpf']:5.2f}  n={rec['n']}", flush=True)


if __name__ == "__main__":
    main()
