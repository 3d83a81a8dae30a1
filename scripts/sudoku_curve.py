"""Learning curves: solve rate of a run's snapshots against the training examples they had seen, for the diffusion
model and the autoregressive baseline trained with the same budget.

    python scripts/sudoku_curve.py --size 6 --batch-size 32 --n 200 \
        --run diffusion=runs/ckpts/sudoku6 --run autoregressive=runs/ckpts/sudoku6ar \
        --out benchmarks/sudoku/6x6/learning_curve.json --plot benchmarks/sudoku/6x6/solve_rate_vs_examples.png

A run directory holds one checkpoint per snapshot, named step-<N>. A run whose name starts with `autoregressive`
is decoded left to right (one token per pass); any other with diffusion at the model's default step cap. Existing
points in --out are kept (only new snapshots are evaluated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dgemma.checkpoint.load import load_model
from dgemma.tasks import sudoku
from dgemma.tasks.sudoku_run import evaluate


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "solve_rate", "puzzles solved (%)"),
                           (axes[1], "cell_accuracy", "blank cells right (%)")):
        for name, points in results["runs"].items():
            xs = sorted(points, key=int)
            ax.plot([points[x]["examples"] for x in xs], [100 * points[x][key] for x in xs],
                    "s--" if name.startswith("autoregressive") else "o-", label=name)
        ax.set_xlabel("training examples")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    n = results["size"]
    same = ", same training budget" if results.get("same_budget") else ""  # runs compared side by side
    fig.suptitle(f"Sudoku {n}x{n}: {results['n']} held-out puzzles (seed {results['seed']}){same}")
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=6, choices=(4, 6, 9))
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--batch-size", type=int, required=True, help="the runs' batch size (examples per step)")
    ap.add_argument("--start", action="append", default=[], metavar="NAME=EXAMPLES",
                    help="examples a run had seen before its step 0 (a run continued from another with --init)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--every", type=int, default=1, help="evaluate every k-th snapshot (and the last)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--same-budget", action="store_true",
                    help="the runs are alternatives trained on the same budget (said in the plot's title), not "
                         "consecutive stages of one model")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if (results.get("n"), results.get("seed"), results.get("size")) != (args.n, args.seed, args.size):
        results = {"n": args.n, "seed": args.seed, "size": args.size, "blanks": list(sudoku.default_blanks(args.size)),
                   "runs": {}}
    results["same_budget"] = args.same_budget or results.get("same_budget", False)
    start = {k: int(v) for k, _, v in (s.partition("=") for s in args.start)}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--run expects NAME=DIR, got {spec!r}")
        snaps = sorted((int(p.name.split("-")[1]), p) for p in Path(folder).glob("step-*") if p.is_dir())
        if not snaps:
            raise SystemExit(f"{folder}: no step-<N> snapshots")
        picked = snaps[::args.every] + ([snaps[-1]] if (len(snaps) - 1) % args.every else [])
        points = results["runs"].setdefault(name, {})
        for step, path in picked:
            if str(step) in points:
                continue
            model = load_model(path)
            r = evaluate(model, n=args.n, seed=args.seed, autoregressive=name.startswith("autoregressive"))["default"]
            r.pop("buckets")
            points[str(step)] = {"examples": start.get(name, 0) + step * args.batch_size, **r}
            print(f"{name} step {step}: solved {r['solve_rate']:.1%}, cells {r['cell_accuracy']:.1%}, "
                  f"steps {r['mean_steps']:.1f}", file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
