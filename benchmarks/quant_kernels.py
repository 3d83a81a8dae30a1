"""Which int8 / int4 weight-only kernel is fastest on this CPU, at the 26B-A4B shapes.

For every weight shape of one layer (attention projections and dense MLP at 256 canvas rows, one expert's gate_up /
down at the ~16 rows a 256-token canvas routes to each of 128 experts at top-8, and the same at 256 rows) it times:
fp32 dense GEMM (the reference), int8 "dequant" and "pack", int4 "dequant" and "pack", and prints GFLOP/s and the
ratio to fp32. Fp32 activations (what the model computes in on CPUs without native bf16).

    OMP_NUM_THREADS=1 python benchmarks/quant_kernels.py [--threads 1] [--repeats 5] [--json-out F]
"""

from __future__ import annotations

import argparse
import json

import torch

from dgemma import hardware
from dgemma.bench.measure import best_time
from dgemma.quant import kernels as K

SHAPES = {  # name: (out N, in K)
    "q_proj": (16 * 256, 2816),
    "mlp.gate_proj": (2112, 2816),
    "mlp.down_proj": (2816, 2112),
    "expert.gate_up": (2 * 704, 2816),
    "expert.down": (2816, 704),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--rows", default="16,256")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    info = hardware.describe()
    print(f"# {info['cpu']} flags={','.join(info['flags'])} threads={args.threads} torch {info['torch']}")
    rows_out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s8 = torch.rand(n, generator=g) * 1e-3
        p4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        s4 = (torch.rand(n, k // args.group, generator=g) * 1e-2).to(torch.bfloat16)
        kw, sz = K.int4_to_kernel_layout(p4, s4)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, generator=g)
            cands = {
                "fp32 dense": lambda: x @ w.t(),
                "int8 dequant": lambda: K.int8_linear_dequant(x, q8, s8),
                "int8 pack(bf16 act)": lambda: K.int8_linear_pack(x, q8, s8),
                "int4 dequant": lambda: K.int4_linear_dequant(x, p4, s4, args.group),
                "int4 pack(bf16 act)": lambda: K.int4_linear_pack(x, kw, sz, args.group),
            }
            flop = 2.0 * m * n * k
            t = {c: best_time(f, args.repeats) for c, f in cands.items()}
            for c, sec in t.items():
                rec = {"shape": name, "rows": m, "N": n, "K": k, "kernel": c, "ms": sec * 1e3,
                       "gflops": flop / sec / 1e9, "vs_fp32": t["fp32 dense"] / sec}
                rows_out.append(rec)
                print(f"{name:16s} M={m:4d} {c:22s} {sec*1e3:8.2f} ms {rec['gflops']:7.1f} GFLOP/s  "
                      f"x{rec['vs_fp32']:.2f} vs fp32")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": info, "group": args.group, "results": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
