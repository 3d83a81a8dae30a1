"""Profile one full dgemma denoising step (decoder forward + sampler + acceptance + renoise) with torch.profiler.

    python benchmarks/profile_step.py [--preset small-moe] [--dtype float32] [--rng fast] [--threads 1] [--top 15]

The model has random weights built in memory (dgemma.presets.random_model). Generation runs through
`model.stream()`: the first Draft event (prefill + step 1, which has no self-conditioning input) is consumed
before the profiler starts, so the profile holds exactly step 2, a steady-state step with self-conditioning.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgemma.presets import random_model
from dgemma.generate import Draft


def profile_step(preset: str, dtype: str, rng: str, prompt_len: int, steps: int, seed: int, device: str,
                 warmup: int = 1):
    model = random_model(preset, dtype, device, seed=seed)
    c = model.config.canvas_length
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    kw = dict(max_new_tokens=c, seed=seed, max_denoising_steps=steps, stability_threshold=None,
              confidence_threshold=None, rng=rng)
    for _ in range(warmup):
        for _ in model.stream(prompt, **kw):
            pass
    events = model.stream(prompt, **kw)
    ev = next(events)
    while not isinstance(ev, Draft):  # prefill + step 1
        ev = next(events)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        ev = next(events)  # step 2
        wall = time.perf_counter() - t0
    assert isinstance(ev, Draft) and ev.step == 2
    for _ in events:
        pass
    return prof, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-moe")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rng", default="fast", choices=["fast", "reference"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--group-by-shape", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prof, wall = profile_step(args.preset, args.dtype, args.rng, args.prompt_len, args.steps, args.seed, args.device)
    print(f"{args.preset} {args.dtype} rng={args.rng}, {torch.get_num_threads()} threads: one denoising step "
          f"{wall * 1e3:.1f} ms (under the profiler)")
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=args.group_by_shape).table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
