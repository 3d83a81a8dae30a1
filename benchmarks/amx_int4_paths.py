"""The native kernel's two int4 paths side by side: scaled expansion against group-scaled, at the 26B-A4B shapes.

Scaled expansion writes bf16((q - 8) x scale) tiles (the weight rounded to bf16) and accumulates over all of K;
group-scaled writes q - 8 tiles (exact in bf16) and multiplies each scale group's fp32 sums by the scales (the
exact weight). Random int4 weights (group 64) and bf16 activations; for each case both paths are timed alternately
in one process (best of --repeats), and each one's largest error against x @ W.T with the fp32 dequantized weight
is printed next to the size of the outputs.

    python benchmarks/amx_int4_paths.py [--threads 1] [--repeats 5] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dgemma import hardware
from dgemma.quant import lowbit, native

# (name, experts, rows per expert, N, K): 128 experts' gate_up / down at the rows a 256-token canvas gives each
# (~16 at top-8) and around it; dense projections at 256 canvas rows.
CASES = [
    ("experts gate_up", 128, 8, 1408, 2816),
    ("experts gate_up", 128, 16, 1408, 2816),
    ("experts gate_up", 128, 32, 1408, 2816),
    ("experts gate_up", 16, 64, 1408, 2816),
    ("experts down", 128, 16, 2816, 704),
    ("dense q_proj", 1, 256, 4096, 2816),
    ("dense mlp.down", 1, 256, 2816, 2112),
]
GROUP = 64


def random_int4(experts: int, n: int, k: int, gen: torch.Generator) -> lowbit.Int4Tensor:
    """Random int4 weights [experts, n, k], group GROUP, scales of the size real checkpoints have."""
    packed = torch.randint(0, 256, (experts, n, k // 2), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(experts, n, k // GROUP, generator=gen) * 0.004 + 0.001).to(torch.bfloat16)
    return lowbit.Int4Tensor(packed, scale, GROUP, False, shape=(experts, n, k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = native.extension()
    if mod is None:
        raise SystemExit("the native AMX kernel is not available on this machine")
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    load = os.getloadavg()
    for name, experts, per, n, k in CASES:
        q = random_int4(experts, n, k, gen)
        t = native.to_tiles(q)
        rows = experts * per
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        a = torch.cat([x, torch.zeros(native.TILE_N, k, dtype=torch.bfloat16)])
        offsets = torch.arange(0, rows + 1, per, dtype=torch.int64)
        paths = {"scaled": 0, "group_scaled": native.ALL_ROWS}
        best = dict.fromkeys(paths, float("inf"))
        out = {}
        for _ in range(args.repeats):
            for path, exact in paths.items():
                start = time.perf_counter()
                out[path] = mod.woq_grouped(a, offsets, t.codes, t.scale, 0, n, k, GROUP, 0, exact, False)
                best[path] = min(best[path], time.perf_counter() - start)
        ref = torch.cat([x[offsets[e]:offsets[e + 1]].float() @ q.dequantize(torch.float32, e).t()
                         for e in range(experts)])
        flops = 2 * rows * n * k
        rec = {"case": name, "experts": experts, "rows_per_expert": per, "n": n, "k": k,
               "output_max_abs": ref.abs().max().item()}
        for path in paths:
            rec[path] = {"ms": best[path] * 1e3, "gflops": flops / best[path] / 1e9,
                         "max_abs_error_vs_fp32_weight": (out[path] - ref).abs().max().item()}
        rec["group_scaled_over_scaled"] = best["group_scaled"] / best["scaled"]
        rows_out.append(rec)
        s, g = rec["scaled"], rec["group_scaled"]
        print(f"{name:16s} {experts:3d} x {per:3d} rows, N {n} K {k}: scaled {s['ms']:6.1f} ms "
              f"(err {s['max_abs_error_vs_fp32_weight']:.1e}), group-scaled {g['ms']:6.1f} ms "
              f"(err {g['max_abs_error_vs_fp32_weight']:.1e}); ratio {rec['group_scaled_over_scaled']:.2f}; "
              f"outputs up to {rec['output_max_abs']:.1f}", flush=True)
    if args.json_out:
        result = {"machine": {**hardware.describe(), "threads": args.threads, "load_start": load,
                              "load_end": os.getloadavg()}, "group": GROUP, "cases": rows_out}
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
