"""Diffusion against left-to-right decoding, side by side on the same weights.

One process: the machine's matmul peak (the model's shapes, its compute dtype) and read bandwidth, and the same
quantized random checkpoint timed two ways: one denoising step over the canvas (`dgemma bench`'s timing), and
left-to-right decoding (`decoder="autoregressive"`: the causal stack, one token per pass, greedy, EOS ignored).
Prints tokens/s for diffusion at the release's stated 15 and 20 tokens per forward pass and at the tokens per
forward pass the bundled Sudoku models reach on their held-out puzzles (measured here), and for left to right;
with each one's floors: a denoising step's compute floor (2 x active parameters x canvas at the peak) and
bandwidth floor (every stored byte once), a left-to-right token's bandwidth floor (the bytes it reads once: all
but the experts, the token table whole, and the top-k share of the experts') and compute floor (2 x active parameters).

With `--step-cache POLICY` (default "fast", the recommended one; "none" skips it): one canvas decoded at 15 and at 20
tokens per forward pass under the policy, pass by pass (bench.measure.step_cache_trajectory: the first and every
refresh pass over every position, the others over what has not settled, in the case the cache is built for, where
every accepted token keeps its value), timed as decoder + LM-head passes; the step under the policy is the measured
step less (1 - ratio) of an exact pass (the ratio: that canvas's passes over as many exact passes; the sampler
still draws every position), giving the policy's tokens/s at that rate.

Every timing routes each token to experts drawn at random (`--routing spread`, the default:
`bench.measure.spread_routing`), as a trained model's load-balanced router spreads a canvas over all the experts; a
random checkpoint's own router (`--routing own`) sends most of a canvas to a few experts, which makes a step's
expert work a few large matmuls and the step faster than a real model's.

`--rounds R` alternates the peak and bandwidth measurements, the step and the left-to-right timings R times and
keeps the best of each (this VM's speed drifts by 2x within minutes; the per-round figures are in the JSON).

    python benchmarks/diffusion_vs_ar.py --preset 26b-a4b --scheme int4 --threads 1 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dgemma import load_model
from dgemma.ar import ar_generate
from dgemma.bench.fullsize import measure_bandwidth, token_weight_bytes, weight_bytes
from dgemma.bench.measure import ROUTINGS, Clock, PassTimer, measure_peak, routed, run_timed, step_cache_trajectory
from dgemma.checkpoint.quantize import random_quantized_checkpoint
from dgemma.config import STEP_CACHE, ModelConfig
from dgemma.hardware import describe
from dgemma.tasks import sudoku, sudoku_run

MODELS = Path(__file__).resolve().parents[1] / "src" / "dgemma" / "models"


def sudoku_tokens_per_forward(n: int) -> dict[str, float]:
    """Tokens per decoder pass of the bundled Sudoku models on held-out puzzles (seed 424242)."""
    out = {}
    for name, blanks in (("sudoku", (30, 50)), ("sudoku6", (12, 24))):
        model = load_model(MODELS / name)
        size = sudoku_run.task_spec(model).size
        puzzles = [p for p, _ in sudoku.generate_many(n, seed=424242, blanks=blanks, size=size)]
        res = sudoku_run.solve_batch(model, puzzles, seed=0, batch_size=16)
        # tokens over passes, summed over the puzzles (a mean of per-puzzle ratios would weight easy puzzles up)
        passes = sum(r["steps"] for r in res)
        out[f"{size}x{size}"] = sum(r["tokens_per_forward"] * r["steps"] for r in res) / passes
    return out


def ar_token_s(model, prompt: list[int], tokens: int) -> float:
    """Seconds per left-to-right token after the prefill: (n + k tokens) - (1 token), over k."""
    def run(n: int) -> float:
        t = time.perf_counter()
        ar_generate(model, prompt, max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t

    run(1)  # warm-up
    return (run(1 + tokens) - run(1)) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--scheme", default="int4")
    ap.add_argument("--model-dir", default=None, help="default /tmp/dgemma-bench/<preset>-<scheme> (written once)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps timed (a step's time is taken between)")
    ap.add_argument("--rounds", type=int, default=2, help="step and left-to-right timings alternated; best of each")
    ap.add_argument("--ar-tokens", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--sudoku-puzzles", type=int, default=64)
    ap.add_argument("--step-cache", default="fast", choices=[k for k, v in STEP_CACHE.items() if v] + ["none"])
    ap.add_argument("--routing", default="spread", choices=ROUTINGS,
                    help="spread: experts drawn at random per token (a random checkpoint); own: its router")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir or f"/tmp/dgemma-bench/{args.preset}-{args.scheme}")
    if not (model_dir / "config.json").is_file():
        random_quantized_checkpoint(model_dir, args.preset, args.scheme, seed=0, dtype="bfloat16",
                                    group=32 if args.preset == "tiny" else 64, progress=False)
    load_start = os.getloadavg()
    sudoku_tpf = sudoku_tokens_per_forward(args.sudoku_puzzles)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    model = load_model(model_dir)
    device = model.device
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    # rounds alternate the two, and each side keeps its best: this VM's speed drifts by 2x within minutes. The peak
    # and the bandwidth are measured in every round too, and the floors use the best of them, as the timings do
    # (a peak measured once, in a slow minute, would make the step look closer to its floor than it is).
    step_rounds, token_rounds, peak_rounds, bandwidth_rounds = [], [], [], []
    for r in range(args.rounds):
        peak_rounds.append(measure_peak(cfg, model.dtype, device)["gflops"])
        bandwidth_rounds.append(measure_bandwidth())
        clock = Clock(device)
        with routed(model, args.routing, seed=r):
            run_timed(model, prompt, cfg.canvas_length, args.steps, 0, "fast", clock)
            step_rounds.append(clock.record()["step_intervals_s"])
            token_rounds.append(ar_token_s(model, prompt[0].tolist(), args.ar_tokens))
    step_s = min(min(r) for r in step_rounds)
    token_s = min(token_rounds)
    peak, bandwidth = max(peak_rounds) * 1e9, max(bandwidth_rounds) * 1e9
    cached = {}
    if args.step_cache != "none":
        timer = PassTimer(model, args.prompt_len)
        for rate in (15.0, 20.0):
            with routed(model, args.routing, seed=int(rate)):
                t = step_cache_trajectory(timer, STEP_CACHE[args.step_cache], rate)
            # the policy shortens the decoder passes only: the sampler still draws every position, so the step
            # loses (1 - ratio) of a pass (the run's exact passes, at most the step), not of itself
            cached_step = step_s - (1 - t["ratio"]) * min(t["full_pass_min_s"], step_s)
            speed = rate / cached_step
            cached[f"stated_{rate:.0f}"] = t | {"step_s": cached_step, "tokens_per_s": speed,
                                                "vs_left_to_right": speed * token_s}

    stored = weight_bytes(model_dir)
    active_bytes = token_weight_bytes(model_dir, cfg)
    canvas = cfg.canvas_length
    floors = {"diffusion_step_compute_s": 2 * cfg.active_params * canvas / peak,
              "diffusion_step_bandwidth_s": stored / bandwidth,
              "ar_token_bandwidth_s": active_bytes / bandwidth, "ar_token_compute_s": 2 * cfg.active_params / peak}
    tpf = {"stated_15": 15.0, "stated_20": 20.0, **{f"sudoku_{k}": v for k, v in sudoku_tpf.items()}}
    diffusion = {k: {"tokens_per_forward": v, "tokens_per_s": v / step_s,
                     "vs_left_to_right": (v / step_s) / (1 / token_s)} for k, v in tpf.items()}
    result = {"machine": {**describe(), "threads": torch.get_num_threads(), "load_start": load_start,
                          "load_end": os.getloadavg()},
              "preset": args.preset, "scheme": args.scheme, "routing": args.routing, "compute_dtype": str(model.dtype),
              "matmul_peak_gflops": peak / 1e9, "read_bandwidth_gbs": bandwidth / 1e9, "weights_gb": stored / 1e9,
              "active_weight_gb": active_bytes / 1e9, "diffusion_step_s": step_s, "ar_token_s": token_s,
              "step_intervals_s_by_round": step_rounds, "ar_token_s_by_round": token_rounds,
              "matmul_peak_gflops_by_round": peak_rounds, "read_bandwidth_gbs_by_round": bandwidth_rounds,
              "ar_tokens_per_s": 1 / token_s, "diffusion": diffusion, "floors": floors,
              "step_cache": {"policy": args.step_cache, **cached}}
    m = result["machine"]
    print(f"{args.preset} {args.scheme} on {m['cpu']}, {m['threads']} thread(s), load {load_start[0]:.1f}: "
          f"peak {peak / 1e9:.1f} GFLOP/s ({model.dtype}), read {bandwidth / 1e9:.1f} GB/s (best of the rounds: "
          f"{' / '.join(f'{g:.0f}' for g in peak_rounds)} GFLOP/s)")
    print(f"  denoising step {step_s:.3f} s (floors: compute {floors['diffusion_step_compute_s']:.3f} s, "
          f"bandwidth {floors['diffusion_step_bandwidth_s']:.3f} s)")
    print(f"  left to right {token_s:.3f} s/token = {1 / token_s:.2f} tokens/s (floors: bandwidth "
          f"{floors['ar_token_bandwidth_s']:.4f} s, compute {floors['ar_token_compute_s']:.4f} s)")
    for k, d in diffusion.items():
        print(f"  diffusion at {d['tokens_per_forward']:.2f} tokens/forward ({k}): {d['tokens_per_s']:.2f} tokens/s "
              f"= {d['vs_left_to_right']:.2f}x left to right")
    for k, t in cached.items():
        print(f"  step_cache={args.step_cache} at {t['tokens_per_forward']:.0f} tokens/forward: {t['passes']} passes "
              f"at {t['ratio']:.2f} of an exact pass ({t['full_pass_s']:.3f} s), step {t['step_s']:.3f} s: "
              f"{t['tokens_per_s']:.2f} tokens/s = "
              f"{t['vs_left_to_right']:.2f}x left to right")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
