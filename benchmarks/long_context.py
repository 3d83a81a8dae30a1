"""Long prompts: prefill tokens/s and peak RSS against prompt length, and the cost of one canvas step over a long
cache. Each length runs in its own process, so its peak RSS is its own.

    python benchmarks/long_context.py --preset small-moe --lengths 1024,4096,16384,32768 --threads 2
    python benchmarks/long_context.py --preset long-small --lengths 8192,32768,131072

`long-small` is hidden 128, 4 layers (3 sliding + 1 full), window 256. Prints a Markdown table; --json-out keeps
the raw rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from dgemma.hardware import cpu_model

LONG_SMALL = dict(
    vocab_size=262, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1, num_experts=4,
    top_k_experts=2, moe_intermediate_size=64, sliding_window=256,
    layer_types=["sliding_attention"] * 3 + ["full_attention"], canvas_length=256,
)


def one(preset: str, length: int, steps: int, threads: int) -> dict:
    import torch

    from dgemma.presets import random_model

    torch.set_num_threads(threads)
    spec = LONG_SMALL if preset == "long-small" else preset
    model = random_model(spec, max_position_embeddings=length + 2048)
    cfg = model.config
    ids = torch.randint(3, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.module.new_cache(1, length)
        t0 = time.perf_counter()
        model.module.encode(ids, cache)
        prefill = time.perf_counter() - t0
        canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length))
        model.module.decode_hidden(canvas, cache)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            model.module.lm_head(model.module.decode_hidden(canvas, cache))
        step = (time.perf_counter() - t0) / steps
    kv = sum(k.numel() * k.element_size() * 2 for k in cache.k)
    return {"length": length, "prefill_s": prefill, "prefill_tok_s": length / prefill, "step_s": step,
            "kv_cache_mib": kv / 2**20, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prefill_chunk": model.module.prefill_chunk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out")
    ap.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(one(args.preset, args._one, args.steps, args.threads)))
        return
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--_one", str(n)], capture_output=True, text=True)
        if out.returncode:
            print(f"{n}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n}: prefill {r['prefill_s']:.1f}s ({r['prefill_tok_s']:.0f} tok/s), step {r['step_s']:.3f}s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print(f"\n{args.preset}, {cpu_model()}, {args.threads} thread(s)\n")
    print("| prompt tokens | prefill s | prefill tok/s | canvas step s | KV cache MiB | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['prefill_s']:.1f} | {r['prefill_tok_s']:.0f} | {r['step_s']:.3f} | "
              f"{r['kv_cache_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"preset": args.preset, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
