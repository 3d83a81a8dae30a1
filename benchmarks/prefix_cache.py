"""Prefix caching: two requests that share a long prefix (a system prompt, an earlier turn), cold then warm.

    python benchmarks/prefix_cache.py                       # small-moe, 2000 shared tokens, 2 denoising steps
    python benchmarks/prefix_cache.py --shared 8000 --threads 2 --json-out benchmarks/results/prefix_cache.json

Request 1 (shared prefix + its own 60 tokens) runs on an empty PrefixCache (cold), request 2 (the same prefix +
another 60 tokens) right after it (warm). The issue's contract: request 2 reports >= 1900 cached tokens of a
2000-token prefix, gives what it gives on an empty cache, and takes under 40% of request 1's wall time. Each
request is also timed without a cache, and request 2 on an empty cache (the tokens must match the warm run).
Each measurement runs --repeat times (a fresh cache each time); the fastest run is reported (the machine may be
shared: other processes only ever add time), the median and every sample are kept in the JSON.
Prints the CPU, torch threads and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--shared", type=int, default=2000, help="tokens both prompts start with")
    ap.add_argument("--own", type=int, default=60, help="tokens after the shared prefix, different per request")
    ap.add_argument("--steps", type=int, default=2, help="max_denoising_steps")
    ap.add_argument("--block", type=int, default=None, help="PrefixCache block_tokens (default: its default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is reported")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    import torch

    from dgemma.hardware import cpu_model
    from dgemma.prefix_cache import PrefixCache
    from dgemma.presets import random_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_model(args.preset)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    shared = torch.randint(3, vocab, (args.shared,), generator=g).tolist()
    prompts = [shared + torch.randint(3, vocab, (args.own,), generator=g).tolist() for _ in range(2)]
    kw = dict(max_new_tokens=model.config.canvas_length, seed=args.seed, max_denoising_steps=args.steps,
              stability_threshold=None)  # run every step: the same work cold and warm

    def new_cache() -> PrefixCache:
        return PrefixCache(4 << 30) if args.block is None else PrefixCache(4 << 30, block_tokens=args.block)

    def timed(prompt, cache):
        t0 = time.perf_counter()
        out = model.generate(prompt, prefix_cache=cache, **kw)
        return time.perf_counter() - t0, out

    def median(samples: list[float]) -> float:
        return sorted(samples)[len(samples) // 2]

    timed(prompts[0][:300], None)  # warm-up: allocator, kernels
    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {k: [] for k in ("none1", "none2", "cold", "warm", "alone")}
    for _ in range(args.repeat):
        t, _ = timed(prompts[0], None)
        samples["none1"].append(t)
        t, plain = timed(prompts[1], None)
        samples["none2"].append(t)
        cache = new_cache()
        t, cold = timed(prompts[0], cache)
        samples["cold"].append(t)
        t, warm = timed(prompts[1], cache)
        samples["warm"].append(t)
        t, alone = timed(prompts[1], new_cache())  # request 2 on an empty cache: what warm must reproduce
        samples["alone"].append(t)
    cold_s, warm_s, alone_s = min(samples["cold"]), min(samples["warm"]), min(samples["alone"])
    rows = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "preset": args.preset, "dtype": str(model.dtype),
        "shared_tokens": args.shared, "prompt_tokens": [len(p) for p in prompts],
        "block_tokens": cache.block_tokens, "prefill_chunk_without_cache": model.module.prefill_chunk,
        "max_denoising_steps": args.steps, "new_tokens": len(warm.ids),
        "no_cache_s": [round(min(samples["none1"]), 3), round(min(samples["none2"]), 3)],
        "cold_s": round(cold_s, 3), "cold_prefill_s": round(cold.timings["prefill_s"], 3),
        "warm_s": round(warm_s, 3), "warm_prefill_s": round(warm.timings["prefill_s"], 3),
        "request2_empty_cache_s": round(alone_s, 3),
        "cached_tokens": [cold.cached_tokens, warm.cached_tokens],
        "warm_over_cold": round(warm_s / cold_s, 3),
        "warm_equals_empty_cache": warm.ids == alone.ids,
        "warm_equals_no_cache": warm.ids == plain.ids,
        "cache": cache.stats(), "repeat": args.repeat,
        "samples_s": {k: [round(t, 3) for t in v] for k, v in samples.items()},
        "median_s": {k: round(median(v), 3) for k, v in samples.items()},
        "warm_over_cold_median": round(median(samples["warm"]) / median(samples["cold"]), 3),
    }
    print(f"CPU: {rows['cpu']}; torch threads {rows['threads']}; load average {load_before} before, "
          f"{rows['loadavg_after']} after")
    print(f"{args.preset} ({rows['dtype']}), prompts of {rows['prompt_tokens']} tokens sharing {args.shared}, "
          f"{args.steps} denoising steps, {rows['new_tokens']} new tokens, block {rows['block_tokens']}")
    print(f"| request | cache | wall s (best of {args.repeat}) | prefill s (last run) | cached tokens |")
    print("| --- | --- | ---: | ---: | ---: |")
    print(f"| 1 | none | {rows['no_cache_s'][0]} | | - |")
    print(f"| 2 | none | {rows['no_cache_s'][1]} | {plain.timings['prefill_s']:.3f} | - |")
    print(f"| 1 | empty (cold) | {rows['cold_s']} | {rows['cold_prefill_s']} | {cold.cached_tokens} |")
    print(f"| 2 | after 1 (warm) | {rows['warm_s']} | {rows['warm_prefill_s']} | {warm.cached_tokens} |")
    print(f"| 2 | empty | {rows['request2_empty_cache_s']} | {alone.timings['prefill_s']:.3f} | "
          f"{alone.cached_tokens} |")
    print(f"warm / cold = {rows['warm_over_cold']:.3f} (medians: {rows['warm_over_cold_median']:.3f}; contract: "
          f"< 0.40); cached {warm.cached_tokens} of {args.shared} shared (contract: >= 1900 of 2000); warm tokens "
          f"== empty-cache tokens: {rows['warm_equals_empty_cache']}; == no-cache tokens: "
          f"{rows['warm_equals_no_cache']} (prefill passes of {rows['prefill_chunk_without_cache']} without the "
          f"cache, {rows['block_tokens']} with it)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
