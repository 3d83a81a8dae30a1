"""Which step-cache settings keep the bundled Sudoku models' quality: solve rate and mean steps on held-out puzzles
for (settle, refresh) pairs beyond the named policies, against the exact path, same puzzles and seeds.

    python benchmarks/step_cache_sweep.py --threads 2 --out benchmarks/results/step_cache_policy_sweep.json

Each candidate runs as the "fastest" entry of config.STEP_CACHE for the duration (the generation settings accept
only named policies); the named ones are measured by benchmarks/step_cache.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dgemma import load_model
from dgemma.config import STEP_CACHE, StepCachePolicy
from dgemma.hardware import describe
from dgemma.tasks import sudoku, sudoku_run

MODELS = Path(__file__).resolve().parents[1] / "src" / "dgemma" / "models"
CANDIDATES = {"off": None, "settle2_refresh3": StepCachePolicy(2, 3), "settle2_refresh4": StepCachePolicy(2, 4),
              "settle2_refresh5": StepCachePolicy(2, 5), "settle2_refresh6": StepCachePolicy(2, 6),
              "settle1_refresh3": StepCachePolicy(1, 3), "settle1_refresh4": StepCachePolicy(1, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=424242, help="held-out puzzle seed (the training scripts never use it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = STEP_CACHE["fastest"]
    out = {"machine": describe(), "puzzles": args.puzzles, "seed": args.seed, "models": {}}
    try:
        for name, blanks in (("sudoku", (30, 50)), ("sudoku6", (12, 24))):
            model = load_model(MODELS / name)
            pairs = sudoku.generate_many(args.puzzles, seed=args.seed, blanks=blanks,
                                         size=sudoku_run.task_spec(model).size)
            puzzles, truth = [p for p, _ in pairs], [s for _, s in pairs]
            rows = out["models"][name] = {}
            for label, policy in CANDIDATES.items():
                STEP_CACHE["fastest"] = policy
                t = time.perf_counter()
                res = sudoku_run.solve_batch(model, puzzles, seed=0, batch_size=16,
                                             step_cache="off" if policy is None else "fastest")
                rows[label] = {"solved": sum(r["solution"] == s for r, s in zip(res, truth)) / args.puzzles,
                               "mean_steps": sum(r["steps"] for r in res) / args.puzzles,
                               "wall_s": time.perf_counter() - t}
                print(f"{name} {label}: solved {rows[label]['solved']:.3f}, steps {rows[label]['mean_steps']:.2f}",
                      flush=True)
    finally:
        STEP_CACHE["fastest"] = saved
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
