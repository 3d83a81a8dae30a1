"""How much a random checkpoint's own routing flatters a full-size step: one decoder + LM-head pass over every
canvas position and over the unsettled positions of step-cache passes, routed by the checkpoint's router and by
`bench.measure.spread_routing` (each token to experts drawn at random, as a trained model's balanced router spreads
a canvas), alternated in one process; with how many experts each routing reaches per layer.

    python benchmarks/routing_ab.py --model-dir /tmp/fullsize/int4 --threads 2 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from dgemma import load_model
from dgemma.bench.measure import PassTimer, spread_routing
from dgemma.hardware import describe
from dgemma.model import Router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--settled", default="0,128,240", help="settled positions of the timed passes (0: a full pass)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    model = load_model(args.model_dir)
    timer = PassTimer(model)
    experts = model.config.num_experts
    reached: list[int] = []

    def count(mod, inputs, out):
        reached.append(int((torch.bincount(out[1].reshape(-1), minlength=experts) > 0).sum()))

    for m in model.module.modules():
        if isinstance(m, Router):
            m.register_forward_hook(count)
    routings = {"own": lambda r: contextlib.nullcontext(), "spread": lambda r: spread_routing(model, seed=r)}
    rows = []
    for settled in (int(s) for s in args.settled.split(",")):
        row: dict = {"settled": settled}
        for r in range(args.repeats):  # alternated, so that a slow minute hits both routings alike
            pos = None if settled == 0 else timer.positions(settled)
            for name, routing in routings.items():
                reached.clear()
                with routing(r):
                    t = timer(pos)
                row.setdefault(f"{name}_pass_s", []).append(t)
                row[f"{name}_experts_per_layer"] = sum(reached) / len(reached)
        row["spread_over_own"] = min(row["spread_pass_s"]) / min(row["own_pass_s"])
        rows.append(row)
        print(f"settled {settled:3d}: own routing {min(row['own_pass_s']):.3f} s ({row['own_experts_per_layer']:.0f} "
              f"experts per layer), spread {min(row['spread_pass_s']):.3f} s "
              f"({row['spread_experts_per_layer']:.0f}): {row['spread_over_own']:.2f}x", flush=True)
    result = {"machine": {**describe(), "threads": torch.get_num_threads(), "load_start": load,
                          "load_end": os.getloadavg()}, "model_dir": args.model_dir, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
