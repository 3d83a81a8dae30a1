"""`dgemma bench --preset P --quantize SCHEME`: one quantized model, timed against this machine's limits.

Writes (once) a random checkpoint of the preset directly in the scheme's layout, measures the machine first (matmul
peak at the model's shapes in the dtype the model computes in, and in fp32; memory read bandwidth), then loads the
model with default settings and runs one canvas at a fixed number of denoising steps, then measures the peak again
(the higher of the two counts). Reports seconds per step and tokens/s next to
- the compute roofline: 2 x active parameters x canvas tokens per step at the measured matmul peak (the issue's
  "2 x 3.8 G x 256"; the full count with attention and self-conditioning is printed too), and
- the memory-bandwidth floor: every stored weight byte read once per step (a 256-token canvas routes to nearly all
  experts) at the measured bandwidth;
and the process's peak RSS. By default (`--routing spread`) the timed canvas is routed as a trained model routes
(`measure.spread_routing`: each token to experts drawn at random), not by the random checkpoint's router, which
sends most of a canvas to a few experts; `--routing own` keeps the checkpoint's router (a trained checkpoint).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from .. import hardware
from ..quant import native
from ..checkpoint.load import load_model, read_header
from ..checkpoint.quantize import random_quantized_checkpoint
from ..config import ModelConfig
from .measure import Clock, measure_peak, routed, run_timed


def measure_bandwidth(gib: float = 0.25, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: the best of `repeats` sums over a `gib` GiB fp32 tensor."""
    a = torch.ones(int(gib * (1 << 30)) // 4)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    n = a.numel() * 4
    del a
    return n / best / 1e9


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def token_weight_bytes(path: Path, cfg: ModelConfig) -> int:
    """Stored bytes one left-to-right token reads: every text tensor once (the tied token table whole: the LM head
    multiplies all of it) but of the routed experts' tensors only the top-k share. Counted from the safetensors
    headers: a share of all stored bytes in proportion to the active parameters would count the bf16 table at the
    low-bit layers' bytes per parameter. The self-conditioning MLP, which left to right does not run, is counted
    (about 0.3% of the total at full size)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        for name, info in read_header(file)[1].items():
            if name == "__metadata__" or "vision" in name:
                continue
            begin, end = info["data_offsets"]
            share = cfg.top_k_experts / cfg.num_experts if ".experts." in name else 1.0
            total += int((end - begin) * share)
    return total


def run(args) -> int:
    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2 (a step's time is taken between steps), got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    scheme, preset = args.quantize, args.preset
    model_dir = Path(args.model_dir or f"/tmp/dgemma-bench/{preset}-{scheme}")
    if not (model_dir / "config.json").is_file():
        group = 32 if preset == "tiny" else 64
        random_quantized_checkpoint(model_dir, preset, scheme, seed=args.seed, dtype="bfloat16", group=group,
                                    progress=sys.stderr.isatty())
    cfg = ModelConfig.from_file(model_dir / "config.json")  # the model's own (it may come from the reference)
    device = torch.device(args.device)
    machine = {**hardware.describe(), "native_kernel": native.available(), "native_engine": native.engine(),
               "fp32_engine": native.FP32_ENGINE if native.fp32_available() else None, "engines": native.describe()}
    load_start = os.getloadavg()[0]
    compute = hardware.default_compute_dtype(torch.bfloat16, device)  # what the bf16-stored parts compute in
    peaks = {str(dt): measure_peak(cfg, dt, device) for dt in dict.fromkeys((compute, torch.float32))}
    peak = peaks[str(compute)]
    bandwidth = measure_bandwidth()

    t0 = time.perf_counter()
    model = load_model(model_dir, device=device)
    load_s = time.perf_counter() - t0
    if model.dtype != compute and str(model.dtype) not in peaks:
        peaks[str(model.dtype)] = measure_peak(cfg, model.dtype, device)
    peak = peaks[str(model.dtype)]
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    clock = Clock(device)
    # a random checkpoint's router sends most of a canvas to a few experts; "spread" routes as a trained model does
    with routed(model, args.routing, args.seed):
        res = run_timed(model, prompt, cfg.canvas_length, args.steps, args.seed, "fast", clock)
    timing = clock.record()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    # the peak again after the timed steps, and the higher of the two: on a VM whose speed drifts, a peak measured
    # once in a slow minute would put the step closer to its roofline than it is
    again = measure_peak(cfg, model.dtype, device)
    peak_rounds = [peak["gflops"], again["gflops"]]
    if again["gflops"] > peak["gflops"]:
        peak = peaks[str(model.dtype)] = again

    canvas = cfg.canvas_length
    issue_flops = 2 * cfg.active_params * canvas
    full_flops = cfg.decoder_flops(args.prompt_len, canvas)["total"]
    stored = weight_bytes(model_dir)
    step_s = timing["step_s"]
    roofline_s = issue_flops / (peak["gflops"] * 1e9)
    fp32_roofline_s = issue_flops / (peaks[str(torch.float32)]["gflops"] * 1e9)
    floor_s = stored / (bandwidth * 1e9)
    result = {
        "preset": preset, "scheme": scheme, "model_dir": str(model_dir), "routing": args.routing, "machine": machine,
        "compute_dtype": str(model.dtype), "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
        "matmul_peak_gflops": peak["gflops"], "peak_gemm": peak["best_gemm"],
        "matmul_peaks_gflops": {k: v["gflops"] for k, v in peaks.items()},
        "matmul_peak_gflops_before_after": peak_rounds,
        "fp32_roofline_step_s": fp32_roofline_s, "step_vs_fp32_roofline": step_s / fp32_roofline_s,
        "read_bandwidth_gbs": bandwidth,
        "weights_gb": stored / 1e9, "load_s": load_s, "peak_rss_gib_after_load": rss_after_load,
        "peak_rss_gib": rss_peak, "prefill_s": timing["prefill_s"], "first_step_s": timing["first_step_s"],
        "step_s": step_s, "steps": args.steps,
        "tokens_per_s_at_16_per_step": args.tokens_per_forward / step_s,
        "roofline_flops_per_step": issue_flops, "counted_flops_per_step": full_flops,
        "roofline_step_s": roofline_s, "bandwidth_floor_step_s": floor_s,
        "step_vs_roofline": step_s / roofline_s, "achieved_gflops": full_flops / step_s / 1e9,
        "generated_ids": len(res.ids),
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{preset} {scheme}: {machine['cpu']} ({', '.join(machine['flags'])}), {torch.get_num_threads()} threads, "
          f"native kernel: {machine['engines']}")
    print(f"  weights {stored / 1e9:.2f} GB, load {load_s:.1f} s, peak RSS {rss_peak:.2f} GiB "
          f"(after load {rss_after_load:.2f} GiB)")
    print(f"  machine: {model.dtype} matmul peak {peak['gflops']:.1f} GFLOP/s ({peak['best_gemm']}), "
          f"fp32 peak {peaks[str(torch.float32)]['gflops']:.1f} GFLOP/s, read bandwidth {bandwidth:.1f} GB/s, "
          f"load average {load_start:.1f} -> {result['loadavg_end']:.1f}")
    print(f"  prefill {args.prompt_len} tokens {timing['prefill_s']:.2f} s; denoising step {step_s:.2f} s "
          f"(first {timing['first_step_s']:.2f} s); {args.tokens_per_forward / step_s:.2f} tokens/s at "
          f"{args.tokens_per_forward:g} tokens per step")
    print(f"  compute roofline {roofline_s:.2f} s/step (2 x {cfg.active_params / 1e9:.2f} G active x {canvas} at the "
          f"{model.dtype} peak) -> {step_s / roofline_s:.2f}x of it (fp32 peak: {fp32_roofline_s:.2f} s, "
          f"{step_s / fp32_roofline_s:.2f}x); all counted matmuls {full_flops / 1e12:.2f} TFLOP/step run at "
          f"{full_flops / step_s / 1e9:.1f} GFLOP/s")
    print(f"  memory-bandwidth floor {floor_s:.2f} s/step (all {stored / 1e9:.1f} GB read once)")
    return 0
