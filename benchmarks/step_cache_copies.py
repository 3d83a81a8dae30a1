"""The step cache's row copies: a pass over the unsettled positions takes their rows of the self-conditioning
probabilities ([B, 256, 262 144] bf16), puts its LM-head rows back into the last pass's output and writes its
positions' K and V into each layer's cache. numerics.take_rows / put_rows (index_select / index_copy_ per batch
row) against gather / scatter_ with the positions' index expanded over the other dims, alternated in one process,
best of --repeats; the results are checked equal.

    python benchmarks/step_cache_copies.py --threads 2 [--positions 128] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dgemma.bench.measure import best_time
from dgemma.hardware import describe
from dgemma.numerics import put_rows, take_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, args.canvas, args.vocab, generator=g).to(torch.bfloat16)
    head = torch.rand(1, args.canvas, args.vocab, generator=g).to(torch.bfloat16)
    rows = torch.randperm(args.canvas, generator=g)[:args.positions].sort().values[None]
    values = torch.rand(1, args.positions, args.vocab, generator=g).to(torch.bfloat16)
    index = rows[..., None].expand(-1, -1, args.vocab)
    assert torch.equal(take_rows(probs, rows), probs.gather(1, index))
    assert torch.equal(put_rows(head.clone(), rows, values), head.clone().scatter_(1, index, values))
    # one layer's K of the 26B-A4B's sliding layers: [1, 8 heads, 64-token prompt + canvas, 256], the positions along T
    cache = torch.rand(1, 8, 64 + args.canvas, 256, generator=g).to(torch.bfloat16)
    k = torch.rand(1, 8, args.positions, 256, generator=g).to(torch.bfloat16)
    kv_index = (rows + 64)[:, None, :, None].expand(-1, 8, -1, 256)
    assert torch.equal(put_rows(cache.clone(), rows + 64, k, dim=2), cache.clone().scatter_(2, kv_index, k))
    times: dict[str, float] = {}
    for _ in range(2):  # alternated
        for name, fn in (("gather", lambda: probs.gather(1, index)), ("take_rows", lambda: take_rows(probs, rows)),
                         ("scatter_", lambda: head.scatter_(1, index, values)),
                         ("put_rows", lambda: put_rows(head, rows, values)),
                         ("kv_scatter_", lambda: cache.scatter_(2, kv_index, k)),
                         ("kv_put_rows", lambda: put_rows(cache, rows + 64, k, dim=2))):
            times[name] = min(times.get(name, float("inf")), best_time(fn, args.repeats, warmup=False))
    result = {"machine": {**describe(), "threads": torch.get_num_threads(), "load": os.getloadavg()},
              "shape": [1, args.canvas, args.vocab], "positions": args.positions, "seconds": times,
              "take_rows_speedup": times["gather"] / times["take_rows"],
              "put_rows_speedup": times["scatter_"] / times["put_rows"],
              "kv_put_rows_speedup": times["kv_scatter_"] / times["kv_put_rows"]}
    print(f"[1, {args.canvas}, {args.vocab}] bf16, {args.positions} positions, {torch.get_num_threads()} thread(s): "
          f"gather {times['gather'] * 1e3:.1f} ms, take_rows {times['take_rows'] * 1e3:.1f} ms "
          f"({result['take_rows_speedup']:.1f}x); scatter_ {times['scatter_'] * 1e3:.1f} ms, put_rows "
          f"{times['put_rows'] * 1e3:.1f} ms ({result['put_rows_speedup']:.1f}x); one layer's K: scatter_ "
          f"{times['kv_scatter_'] * 1e3:.2f} ms, put_rows {times['kv_put_rows'] * 1e3:.2f} ms "
          f"({result['kv_put_rows_speedup']:.1f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
