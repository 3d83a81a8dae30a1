"""Where one canvas pass of a checkpoint goes: wall time of each part (attention, dense MLP, router, experts, the
self-conditioning MLP, the LM head and the self-conditioning product), summed over the layers.

    python benchmarks/pass_parts.py --model-dir DIR [--threads 2] [--repeats 2] [--routing spread]

One prompt of 16 random tokens is prefilled, then `--repeats` decoder passes over a random canvas with a random
self-conditioning signal, under `row_invariant()` (what generation with the default sampler runs) and the routing
of `dgemma.bench.measure.routed` (spread: as a trained model's router). Each part is timed around its module's call,
so the parts add up to a little less than the pass (norms, residuals and RoPE are not attributed).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from dgemma import load_model
from dgemma.bench.measure import ROUTINGS, routed
from dgemma.numerics import row_invariant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--routing", choices=ROUTINGS, default="spread")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model_dir)
    model, cfg = pipe.module, pipe.module.config
    totals: dict[str, float] = collections.defaultdict(float)

    def timed(obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def call(*a, **kw):
            t = time.perf_counter()
            out = inner(*a, **kw)
            totals[name] += time.perf_counter() - t
            return out

        setattr(obj, attr, call)

    for layer in model.layers:
        for part, name in ((layer.self_attn, "attention"), (layer.mlp, "dense MLP"), (layer.router, "router"),
                           (layer.experts, "experts")):
            timed(part, "forward", name)
    timed(model.sc_mlp, "forward", "self-conditioning MLP")
    timed(model.embed_tokens, "head", "LM head")
    timed(model.embed_tokens, "soft", "self-conditioning product")
    gen = torch.Generator().manual_seed(0)
    c = cfg.canvas_length
    prompt = torch.randint(3, cfg.vocab_size, (1, 16), generator=gen)
    canvas = torch.randint(3, cfg.vocab_size, (1, c), generator=gen)
    with torch.inference_mode(), row_invariant(), routed(pipe, args.routing, 0):
        cache = model.new_cache(1, 16 + c)
        model.encode(prompt, cache)
        signal = torch.randn(1, c, cfg.vocab_size, generator=gen)
        for _ in range(args.repeats):
            totals.clear()
            t = time.perf_counter()
            model.decode(canvas, cache, signal)
            wall = time.perf_counter() - t
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
            print(f"pass {wall:.2f} s ({args.threads} threads, {args.routing} routing): {parts}", flush=True)


if __name__ == "__main__":
    main()
