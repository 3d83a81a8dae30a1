"""step_cache: what it saves and what it costs.

Speed: one denoising pass (decoder + LM head) over the whole canvas against passes over a fraction of its positions
(what a step-cache pass computes when the rest has settled), on a random model of a preset, in one run; the ratio
is the figure (same process, same threads). Quality: the bundled Sudoku models on held-out puzzles, every policy of
config.STEP_CACHE against the exact path (solve rate, cells, mean steps, wall time), same puzzles and seeds.

    python benchmarks/step_cache.py --preset small-moe --threads 2 --puzzles 1000 --out benchmarks/results/step_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from dgemma import load_model
from dgemma.config import STEP_CACHE
from dgemma.generate import unsettled_positions
from dgemma.hardware import describe
from dgemma.presets import random_model
from dgemma.tasks import sudoku, sudoku_run

MODELS = Path(__file__).resolve().parents[1] / "src" / "dgemma" / "models"


@torch.inference_mode()
def speed(preset: str, fractions: list[float], repeats: int, prompt_len: int = 64) -> list[dict]:
    model = random_model(preset)
    net, cfg = model.module, model.config
    c = cfg.canvas_length
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g)
    cache = net.new_cache(1, prompt_len, scratch=c)
    net.encode(prompt, cache)
    canvas = torch.randint(3, cfg.vocab_size, (1, c), generator=g)
    probs = torch.softmax(torch.randn(1, c, cfg.vocab_size, generator=g), -1)

    def one(positions):
        t = time.perf_counter()
        net.lm_head_raw(net.decode_hidden(canvas, cache, sc_probs=probs, positions=positions))
        return time.perf_counter() - t

    one(None)  # warm-up, and the full pass leaves every position's K/V in the scratch
    rows = []
    for f in fractions:
        active = torch.zeros(1, c, dtype=torch.bool)
        active[0, torch.randperm(c, generator=g)[:max(1, round(c * (1 - f)))]] = True
        pos = unsettled_positions(active)
        full = min(one(None) for _ in range(repeats))
        part = min(one(pos) for _ in range(repeats))
        rows.append({"settled_fraction": f, "active_positions": int(pos.shape[1]), "full_pass_s": full,
                     "step_cache_pass_s": part, "ratio": part / full})
        print(f"  settled {f:4.0%}: {pos.shape[1]:3d} positions  full {full * 1e3:8.1f} ms  step-cache "
              f"{part * 1e3:8.1f} ms  ratio {part / full:.2f}", flush=True)
    return rows


def quality(model_dir: Path, n: int, blanks: tuple[int, int], seed: int) -> dict:
    model = load_model(model_dir)
    size = sudoku_run.task_spec(model).size
    pairs = sudoku.generate_many(n, seed=seed, blanks=blanks, size=size)
    puzzles, truth = [p for p, _ in pairs], [s for _, s in pairs]
    out = {"model": str(model_dir.relative_to(MODELS.parents[2])), "puzzles": n, "blanks": list(blanks),
           "seed": seed, "policies": {}}
    for name in STEP_CACHE:
        t = time.perf_counter()
        res = sudoku_run.solve_batch(model, puzzles, seed=0, batch_size=16, step_cache=name)
        wall = time.perf_counter() - t
        cells = [sum(a == b for a, b in zip(r["solution"], s)) / len(s) for r, s in zip(res, truth)]
        steps = [r["steps"] for r in res]  # denoising passes of the puzzle's one canvas
        row = {"solved": sum(r["solution"] == s for r, s in zip(res, truth)) / n, "cells": sum(cells) / n,
               "mean_steps": sum(steps) / n, "wall_s": wall}
        out["policies"][name] = row
        print(f"  {out['model']} {name:5s}: solved {row['solved']:.3f}  cells {row['cells']:.3f}  steps "
              f"{row['mean_steps']:.2f}  {wall:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75,0.9")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=424242, help="held-out puzzle seed (the training scripts never use it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": describe(), "threads": torch.get_num_threads(), "load": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "policies": {k: (None if v is None else vars(v)) for k, v in STEP_CACHE.items()}}
    print(f"speed ({args.preset}, {torch.get_num_threads()} thread(s)):", flush=True)
    result["speed"] = {"preset": args.preset,
                       "rows": speed(args.preset, [float(x) for x in args.fractions.split(",")], args.repeats)}
    if not args.skip_quality:
        print("quality:", flush=True)
        result["quality"] = [quality(MODELS / "sudoku", args.puzzles, (30, 50), args.seed),
                             quality(MODELS / "sudoku6", args.puzzles, (12, 24), args.seed)]
    result["machine"]["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
