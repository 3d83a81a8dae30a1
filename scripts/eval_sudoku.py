"""The full Sudoku evaluation: base vs fine-tuned diffusion model (with a step-cap sweep) vs the autoregressive
baseline, on the same held-out puzzles. Writes a JSON results file and a PNG plot of solve rate vs step cap.

    python scripts/eval_sudoku.py [--size 9] [--model DIR] [--ar RUN/final] --n 1000 \
        --out benchmarks/sudoku/results.json --plot benchmarks/sudoku/solve_rate_vs_steps.png

`--size` picks the grid (and the bundled model for it); the puzzles have `sudoku.default_blanks(size)` blanks.

`--parts diffusion,base` recomputes only those rows and keeps the rest of an existing --out file (same puzzles).

The base is the training script's random initialisation (same shape and seed), rebuilt in a temporary folder.
Plotting needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_sudoku import write_base  # noqa: E402

from dgemma.checkpoint.load import load_model  # noqa: E402
from dgemma.tasks import sudoku  # noqa: E402
from dgemma.tasks.sudoku_run import default_model_path, evaluate  # noqa: E402

CAPS = (2, 4, 8, 12, 16, 24, 32, 48)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "solve_rate", "puzzles solved (%)"),
                           (axes[1], "cell_accuracy", "blank cells right (%)")):
        for name, style in (("diffusion", "o-"), ("base", "s--")):
            r = results.get(name)
            if r:
                points = {int(c): v[key] for c, v in r["step_caps"].items()}
                points[r["default_steps"]] = r["default"][key]
                caps = sorted(points)
                ax.plot(caps, [100 * points[c] for c in caps], style,
                        label=f"{'fine-tuned' if name == 'diffusion' else 'base'} (diffusion decoding)")
        ar = results.get("autoregressive")
        if ar:
            passes = results.get("size", 9) ** 2 + 1
            ax.axhline(100 * ar["default"][key], color="gray", linestyle=":",
                       label=f"autoregressive baseline ({passes} passes): {ar['default'][key]:.1%}")
        ax.set_xlabel("max denoising steps per canvas (cap)")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    n = results.get("size", 9)
    fig.suptitle(f"Sudoku {n}x{n}: {results['n']} held-out puzzles with {results['blanks'][0]}-{results['blanks'][1]}"
                 " blanks")
    fig.tight_layout()
    fig.savefig(path)


def markdown(results: dict) -> str:
    """The README's table: one row per model / decoding / step cap."""
    head = ("| model | decoding | step cap | solved | blank cells right | givens kept | mean steps per canvas "
            "| tokens per forward |\n|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []

    def row(model: str, decoding: str, cap: str, r: dict) -> None:
        rows.append(f"| {model} | {decoding} | {cap} | {r['solve_rate']:.1%} | {r['cell_accuracy']:.1%} | "
                    f"{r['givens_kept']:.1%} | {r['mean_steps']:.1f} | {r['tokens_per_forward']:.2f} |")

    for name, label in (("base", "base (before SFT)"), ("diffusion", "bundled (SFT)")):
        r = results.get(name)
        if not r:
            continue
        caps = sorted(int(c) for c in r.get("step_caps", {}))
        for c in caps:
            if c < r["default_steps"]:
                row(label, "diffusion", str(c), r["step_caps"][str(c)])
        row(label, "diffusion", f"{r['default_steps']} (default)", r["default"])
    ref = results.get("reference_rng")
    if ref:
        row("bundled (SFT)", 'diffusion, rng="reference"', f"{ref['default_steps']} (default)", ref["default"])
    ar = results.get("autoregressive")
    if ar:
        row("autoregressive baseline", "left to right", "-", ar["default"])
    return "\n".join([head, *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=9, choices=(4, 6, 9), help="grid side (default 9)")
    ap.add_argument("--model", default=None, help="the fine-tuned diffusion model (default: the bundled one)")
    ap.add_argument("--ar", default=None, help="the autoregressive baseline (trained with --ar-only)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=424242)
    ap.add_argument("--caps", default=",".join(map(str, CAPS)))
    ap.add_argument("--base-seed", type=int, default=0, help="the training script's --seed")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--parts", default="diffusion,reference_rng,base,autoregressive",
                    help="which rows to (re)compute; the others are kept from an existing --out file ('' for none)")
    ap.add_argument("--markdown", action="store_true", help="print the results as the README's table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = [int(c) for c in args.caps.split(",") if c]
    parts = set(args.parts.split(","))
    t0 = time.time()
    out = Path(args.out)
    results: dict = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    computing = parts & {"diffusion", "reference_rng", "base", "autoregressive"}
    if computing:
        if (results.get("n") not in (None, args.n) or results.get("seed") not in (None, args.seed)
                or results.get("size", 9) != args.size):
            results = {}  # a different puzzle set: nothing to keep
        results.update({"n": args.n, "seed": args.seed, "size": args.size,
                        "blanks": list(sudoku.default_blanks(args.size))})
    results.setdefault("commands", {})
    command = "python scripts/eval_sudoku.py " + " ".join(argv or sys.argv[1:])
    fine_tuned = parts & {"diffusion", "reference_rng"}
    model = load_model(args.model or default_model_path(args.size), device=args.device) if fine_tuned else None
    if "diffusion" in parts:
        results["diffusion"] = evaluate(model, n=args.n, seed=args.seed, step_caps=caps)
        results["commands"]["diffusion"] = command
        print(f"diffusion: {results['diffusion']['default']['solve_rate']:.1%}", file=sys.stderr)
    if "reference_rng" in parts:  # the same model with the reference's sampler: the fast one must match it
        results["reference_rng"] = evaluate(model, n=args.n, seed=args.seed, rng="reference")
        results["commands"]["reference_rng"] = command
        print(f"reference rng: {results['reference_rng']['default']['solve_rate']:.1%}", file=sys.stderr)
    if "base" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            base = load_model(write_base(Path(tmp) / "base", args.size, args.base_seed), device=args.device)
            results["base"] = evaluate(base, n=args.n, seed=args.seed, step_caps=[caps[-1]])
        results["commands"]["base"] = command
        print(f"base: {results['base']['default']['solve_rate']:.1%}", file=sys.stderr)
    if "autoregressive" in parts and args.ar:
        ar = load_model(args.ar, device=args.device)
        results["autoregressive"] = evaluate(ar, n=args.n, seed=args.seed, autoregressive=True)
        results["commands"]["autoregressive"] = command
        print(f"autoregressive: {results['autoregressive']['default']['solve_rate']:.1%}", file=sys.stderr)
    if computing:
        results["seconds"] = time.time() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        print(markdown(results))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
