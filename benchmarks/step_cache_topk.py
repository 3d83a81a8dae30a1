"""Would `fast` lose anything with the top-32 self-conditioning input added? The bundled Sudoku models on 1000
held-out puzzles each, `off` / `fast` / `fast` plus `sc_top_k=32` (the last run under the name "fastest", whose
policy this process alone replaces with settle 2, refresh 3, top-32), same puzzles and seeds as
`benchmarks/step_cache.py`.

    python benchmarks/step_cache_topk.py --threads 2 --out benchmarks/results/step_cache_fast_top32.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import step_cache as bench
from dgemma.config import STEP_CACHE, StepCachePolicy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    STEP_CACHE["fastest"] = StepCachePolicy(settle=2, refresh=3, sc_top_k=32)  # this process only
    result = {"fastest_here": vars(STEP_CACHE["fastest"]), "machine": bench.describe(),
              "quality": [bench.quality(bench.MODELS / "sudoku", args.puzzles, (30, 50), 424242),
                          bench.quality(bench.MODELS / "sudoku6", args.puzzles, (12, 24), 424242)]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
