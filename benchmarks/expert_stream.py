"""Does the experts' kernel overlap its work with reading the codes? Per-tile times of the native int4 kernel
(group-scaled path) with the codes in L2 against the codes streamed from memory, next to what reading alone costs.

For each shape (the 26B-A4B experts' gate/up [1408 x 2816] and down [2816 x 704], int4 group 64) and rows per
expert: one expert called again and again (its codes stay in L2), and 128 experts (codes from memory, two sets
alternated so nothing is left in cache), timed alternately in one process. Also the read bandwidth of this many
threads (`bench.fullsize.measure_bandwidth` over 1 GiB) and so the memory's own time per B tile (256 bytes of
codes). If the
kernel overlapped the two, a tile from memory would cost about max(in L2, memory alone); if not, about their sum.

    python benchmarks/expert_stream.py [--threads 1] [--repeats 5] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from amx_int4_paths import GROUP, random_int4
from dgemma import hardware
from dgemma.bench.fullsize import measure_bandwidth
from dgemma.quant import native

SHAPES = [("gate_up", 1408, 2816), ("down", 2816, 704)]
TILE_BYTES = 256  # the codes of one 16 x 32 B tile


def tiles(t: native.TileTensor) -> int:
    return t.codes.numel() * t.codes.element_size() // TILE_BYTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = native.extension()
    if mod is None:
        raise SystemExit("the native kernel is not available on this machine")
    gen = torch.Generator().manual_seed(0)

    def make(experts: int, n: int, k: int) -> native.TileTensor:
        return native.to_tiles(random_int4(experts, n, k, gen))

    load = os.getloadavg()
    gbs = measure_bandwidth(1.0, args.repeats)
    memory_ns = TILE_BYTES * args.threads / gbs  # each thread reads at its share of the bandwidth
    print(f"{hardware.describe()['cpu']}, {args.threads} thread(s), load {load[0]:.1f}: read {gbs:.1f} GB/s, "
          f"{memory_ns:.1f} ns per 256-byte tile and thread")
    rows_out = []
    for name, n, k in SHAPES:
        one, many = make(1, n, k), [make(128, n, k) for _ in range(2)]
        for per in (1, 16):
            small = native.SMALL_ROWS if per <= native.SMALL_ROWS else 0

            def call(t: native.TileTensor, experts: int) -> float:
                a = torch.zeros(experts * per + 16, k, dtype=torch.bfloat16)
                off = torch.arange(0, experts * per + 1, per, dtype=torch.int64)
                t0 = time.perf_counter()
                mod.woq_grouped(a, off, t.codes, t.scale, 0, n, k, GROUP, small, native.ALL_ROWS, False)
                return time.perf_counter() - t0

            in_l2, streamed = [], []
            for r in range(args.repeats):
                for _ in range(8):  # the single expert's calls are short: several per round
                    in_l2.append(call(one, 1) / tiles(one))
                streamed.append(call(many[r % 2], 128) / tiles(many[0]))
            l2_ns = sorted(in_l2)[len(in_l2) // 2] * 1e9 * args.threads
            mem_ns = sorted(streamed)[len(streamed) // 2] * 1e9 * args.threads
            rec = {"shape": name, "n": n, "k": k, "rows_per_expert": per, "in_l2_ns_per_tile_thread": l2_ns,
                   "from_memory_ns_per_tile_thread": mem_ns, "memory_alone_ns_per_tile_thread": memory_ns,
                   "overlapped_would_be_ns": max(l2_ns, memory_ns), "added_would_be_ns": l2_ns + memory_ns}
            rows_out.append(rec)
            print(f"{name:8s} {per:2d} rows: in L2 {l2_ns:5.1f} ns per tile and thread, from memory {mem_ns:5.1f} "
                  f"(overlapped: ~{rec['overlapped_would_be_ns']:.1f}, added: ~{rec['added_would_be_ns']:.1f})",
                  flush=True)
    if args.out:
        result = {"machine": {**hardware.describe(), "threads": args.threads, "load_start": load,
                              "load_end": os.getloadavg()}, "read_gbs": gbs, "cases": rows_out}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
