"""The fp32 engine's kernels (`src/dgemma/quant/csrc/woq_avx2.cpp`) against torch's fp32 BLAS, in one run.

    python benchmarks/fp32_engine.py [--threads 2]

Random int4 tiles at the 26B-A4B's shapes (128 experts x 16 rows: a canvas routed as a trained model; 8 experts x 1
row: left-to-right decoding; one 256-row projection) and the bf16 token table (the LM head and the self-conditioning
product, 256 rows). Prints each call's best time, GFLOP/s and its share of the BLAS's fp32 peak measured in the same
run (square 2048 and the dense MLP's [256 x 2816] @ [2816 x 2112]), and GB/s of int4 codes for the one-row calls.
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import best_time
from dgemma.extension import fp32_extension


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = fp32_extension()
    if mod is None:
        raise SystemExit("the fp32 engine does not run here (it needs AVX2, FMA, F16C and a C++ compiler)")
    gen = torch.Generator().manual_seed(0)
    peaks = []
    for m, k, n in ((2048, 2048, 2048), (256, 2816, 2112)):
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        peaks.append(2 * m * k * n / best_time(lambda: a @ b, 5) / 1e9)
    peak = max(peaks)
    print(f"{args.threads} threads; torch fp32 BLAS peak {peak:.1f} GFLOP/s (square 2048: {peaks[0]:.1f}, "
          f"dense MLP shape: {peaks[1]:.1f})")
    for name, experts, n, k, rows in (("gate/up, 128 experts x 16 rows", 128, 1408, 2816, 16),
                                      ("down, 128 experts x 16 rows", 128, 2816, 704, 16),
                                      ("q projection, 256 rows", 1, 4096, 2816, 256),
                                      ("gate/up, 8 experts x 1 row", 8, 1408, 2816, 1),
                                      ("q projection, 1 row", 1, 4096, 2816, 1)):
        codes = torch.randint(0, 256, (experts, n // 16, k // 32, 4, 64), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(experts, n // 16, k // 64, 16, generator=gen) * 0.01).to(torch.bfloat16)
        offsets = torch.arange(experts + 1, dtype=torch.int64) * rows
        x = torch.randn(experts * rows, k, generator=gen)
        t = best_time(lambda: mod.woq_grouped_f32(x, offsets, codes, scales, 0, n, k, 64), 5)
        gflops = 2 * experts * rows * n * k / t / 1e9
        extra = f", int4 codes {codes.numel() / t / 1e9:.1f} GB/s" if rows == 1 else ""
        print(f"int4 {name}: {t * 1e3:.2f} ms, {gflops:.1f} GFLOP/s ({gflops / peak:.0%} of the peak){extra}")
    table = (torch.randn(262144, 2816, generator=gen) * 0.02).to(torch.bfloat16)
    hidden, probs = torch.randn(256, 2816, generator=gen), torch.rand(256, 262144, generator=gen)
    for name, fn in (("LM head, 256 rows", lambda: mod.dense_bf16_f32(hidden, table, True)),
                     ("self-conditioning product, 256 rows", lambda: mod.dense_bf16_f32(probs, table, False))):
        t = best_time(fn, 2)
        gflops = 2 * 256 * table.numel() / t / 1e9
        print(f"bf16 table, {name}: {t:.2f} s, {gflops:.1f} GFLOP/s ({gflops / peak:.0%} of the peak)")


if __name__ == "__main__":
    main()
