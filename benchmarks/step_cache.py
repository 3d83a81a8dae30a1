"""step_cache: what it saves and what it costs.

Speed: one denoising pass (decoder + LM head) over the whole canvas against passes over a fraction of its positions
(what a step-cache pass computes when the rest has settled), on a random model of a preset (or a checkpoint,
`--model-dir`, e.g. full-size random weights), in one run; the ratio is the figure (same process, same threads).
Quality: the bundled Sudoku models on held-out puzzles, every policy of config.STEP_CACHE against the exact path
(solve rate, cells, mean steps, wall time), same puzzles and seeds; and (`--kl-models N`) the KL divergence of the
final-step distributions against the exact path on N random models built and saved by the reference
(transformers, as the tests build them): same prompts and seeds, every committed position's final-step
distribution in full (logprobs over the whole vocabulary), KL(exact || policy) per position, and the share of
committed tokens that are the same.

    python benchmarks/step_cache.py --preset small-moe --threads 2 --puzzles 1000 \
        --out benchmarks/results/step_cache.json
    python benchmarks/step_cache.py --model-dir /tmp/fullsize/int4 --fractions 0,0.5,0.75,0.9 --repeats 1 \
        --skip-quality --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dgemma import load_model
from dgemma.config import STEP_CACHE
from dgemma.bench.measure import ROUTINGS, PassTimer, routed
from dgemma.generate import Commit, stream
from dgemma.hardware import describe
from dgemma.presets import random_model
from dgemma.tasks import sudoku, sudoku_run

MODELS = Path(__file__).resolve().parents[1] / "src" / "dgemma" / "models"


def speed(preset: str, fractions: list[float], repeats: int, prompt_len: int = 64,
          model_dir: str | None = None, routing: str = "spread") -> list[dict]:
    model = load_model(model_dir) if model_dir else random_model(preset)
    timer = PassTimer(model, prompt_len)
    c = timer.canvas_length
    # the top-k self-conditioning input of the policy that has one ("fastest"), timed as a third pass
    top_k = next((p.sc_top_k for p in STEP_CACHE.values() if p is not None and p.sc_top_k), None)
    rows = []
    for f in fractions:
        pos = timer.positions(c - max(1, round(c * (1 - f))))
        full = part = with_k = float("inf")
        # alternated, so that a noisy minute hits every variant alike; "spread" routes as a trained model does
        # (a random model's own router sends most positions to a few experts: measure.spread_routing)
        for r in range(repeats):
            with routed(model, routing, seed=r):
                full = min(full, timer(None))
                part = min(part, timer(pos))
                if top_k:
                    with_k = min(with_k, timer(pos, top_k))
        row = {"settled_fraction": f, "active_positions": int(pos.shape[1]), "full_pass_s": full,
               "step_cache_pass_s": part, "ratio": part / full}
        if top_k:
            row |= {"sc_top_k": top_k, "top_k_pass_s": with_k, "top_k_ratio": with_k / full}
        rows.append(row)
        print(f"  settled {f:4.0%}: {pos.shape[1]:3d} positions  full {full * 1e3:8.1f} ms  step-cache "
              f"{part * 1e3:8.1f} ms  ratio {part / full:.2f}"
              + (f"  with top-{top_k} self-conditioning {with_k * 1e3:8.1f} ms  ratio {with_k / full:.2f}"
                 if top_k else ""), flush=True)
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


def final_distributions(model, prompt: torch.Tensor, seed: int, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Committed ids [n] and their positions' final-step log-distributions [n, V] (every canvas, all rows)."""
    vocab = model.config.vocab_size
    ids, dists = [], []
    # a fixed 16 steps per canvas (adaptive stopping off), so that positions settle and the cache has work to skip
    for ev in stream(model, prompt, seed=seed, logprobs=vocab, step_cache=policy, max_new_tokens=64,
                     max_denoising_steps=16, stability_threshold=None, confidence_threshold=None):
        if isinstance(ev, Commit):
            values, which = ev.top_logprobs
            full = torch.full((*which.shape[:-1], vocab), float("-inf"))
            full.scatter_(-1, which.long(), values.float())
            ids.append(ev.ids.reshape(-1))
            dists.append(full.reshape(-1, vocab))
    return torch.cat(ids), torch.cat(dists)


def kl(n_models: int) -> dict:
    """KL(exact || policy) of final-step distributions on reference-built random models (see the module doc)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from refmodels import build  # the reference's own model class, saved with save_pretrained

    rows: dict[str, list[dict]] = {name: [] for name in STEP_CACHE if name != "off"}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(n_models):
            _, path = build(Path(tmp), f"ref{seed}", canvas_length=32, seed=seed)
            model = load_model(path, dtype=torch.float32)
            prompt = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
            base_ids, base = final_distributions(model, prompt, seed, "off")
            for name in rows:
                got_ids, got = final_distributions(model, prompt, seed, name)
                n = min(len(got_ids), len(base_ids))  # an EOS may end one run's generation a canvas earlier
                got_ids, got, want_ids, want = got_ids[:n], got[:n], base_ids[:n], base[:n]
                p = want.exp()
                terms = torch.where(p > 0, p * (want - got), torch.zeros(()))
                per_pos = terms.sum(-1)
                rows[name].append({"model_seed": seed, "positions": int(per_pos.numel()),
                                   "kl_mean": float(per_pos.mean()), "kl_max": float(per_pos.max()),
                                   "same_tokens": float((got_ids == want_ids).double().mean())})
                print(f"  ref model {seed} {name:7s}: KL mean {rows[name][-1]['kl_mean']:.2e} max "
                      f"{rows[name][-1]['kl_max']:.2e}  same tokens {rows[name][-1]['same_tokens']:.3f}", flush=True)
    return {name: {"kl_mean": sum(r["kl_mean"] for r in rs) / len(rs), "kl_max": max(r["kl_max"] for r in rs),
                   "same_tokens": sum(r["same_tokens"] for r in rs) / len(rs), "per_model": rs}
            for name, rs in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--model-dir", default=None, help="time this checkpoint instead of a random preset model")
    ap.add_argument("--kl-models", type=int, default=0, help="KL against the exact path on N reference-built models")
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75,0.9")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=424242, help="held-out puzzle seed (the training scripts never use it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--routing", default="spread", choices=ROUTINGS,
                    help="of the speed passes: spread (experts drawn at random: random weights) or own (its router)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": describe(), "threads": torch.get_num_threads(), "load": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "policies": {k: (None if v is None else vars(v)) for k, v in STEP_CACHE.items()}}
    print(f"speed ({args.model_dir or args.preset}, {torch.get_num_threads()} thread(s)):", flush=True)
    result["speed"] = {"preset": args.preset, "model_dir": args.model_dir, "routing": args.routing,
                       "rows": speed(args.preset, [float(x) for x in args.fractions.split(",")], args.repeats,
                                     model_dir=args.model_dir, routing=args.routing)}
    if args.kl_models:
        print("KL of final-step distributions against the exact path:", flush=True)
        result["kl"] = kl(args.kl_models)
    if not args.skip_quality:
        print("quality:", flush=True)
        result["quality"] = [quality(MODELS / "sudoku", args.puzzles, (30, 50), args.seed),
                             quality(MODELS / "sudoku6", args.puzzles, (12, 24), args.seed)]
    result["machine"]["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
