"""The bf16 cliff: a bf16 checkpoint with default settings against the same weights in fp32.

Writes a random bf16 checkpoint of the preset, makes an fp32 copy of exactly the same values, and times one canvas
at a fixed number of denoising steps for: the bf16 checkpoint loaded with default settings (dgemma picks the compute
dtype from the CPU: fp32 without avx512_bf16 / amx_bf16), the fp32 checkpoint, and (with --forced-bf16) the bf16
checkpoint forced to compute in bf16 (what a runtime without the check does). Prints seconds per step and the ratios;
the contract is default-bf16 / fp32 <= 1.3 on CPUs without native bf16.

    OMP_NUM_THREADS=2 python benchmarks/bf16_cliff.py --preset small-moe --steps 4 [--forced-bf16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dgemma
from dgemma import hardware
from dgemma.bench.measure import Clock, run_timed
from dgemma.checkpoint.write import write_random_checkpoint


def step_seconds(model, prompt, steps: int, repeats: int) -> float:
    best = float("inf")
    for r in range(repeats):
        clock = Clock(model.device)
        run_timed(model, prompt, model.config.canvas_length, steps, r, "fast", clock)
        best = min(best, clock.record()["step_s"])
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--forced-bf16", action="store_true", help="also time bf16 compute (slow without native bf16)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = write_random_checkpoint(Path(tmp) / "bf16", args.preset, seed=0, dtype="bfloat16")
        fp32 = Path(tmp) / "fp32"
        fp32.mkdir()
        for f in bf16.iterdir():
            if f.name == "model.safetensors":
                save_file({k: v.float() for k, v in load_file(str(f)).items()}, str(fp32 / f.name))
            elif f.name == "config.json":
                cfg = json.loads(f.read_text())
                cfg["dtype"] = "float32"
                (fp32 / f.name).write_text(json.dumps(cfg))
            else:
                (fp32 / f.name).write_bytes(f.read_bytes())
        prompt = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(0))
        rows = {}
        default = dgemma.load_model(bf16)
        rows["bf16 checkpoint, default settings"] = (str(default.dtype), step_seconds(default, prompt, args.steps,
                                                                                       args.repeats))
        del default
        ref = dgemma.load_model(fp32)
        rows["same weights in fp32"] = (str(ref.dtype), step_seconds(ref, prompt, args.steps, args.repeats))
        del ref
        if args.forced_bf16:
            forced = dgemma.load_model(bf16, dtype="bfloat16")
            rows["bf16 checkpoint, --dtype bfloat16"] = (str(forced.dtype), step_seconds(forced, prompt, args.steps,
                                                                                          1))
    info = hardware.describe()
    base = rows["same weights in fp32"][1]
    print(f"{args.preset}, {args.steps} steps, {torch.get_num_threads()} threads; {info['cpu']} "
          f"({', '.join(info['flags'])}); native bf16: {info['native_bf16']}")
    for name, (dt, s) in rows.items():
        print(f"  {name:36s} computes in {dt:15s} {s:8.3f} s/step  {s / base:6.2f}x fp32")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": info, "preset": args.preset, "steps": args.steps,
                                                   "rows": {k: {"dtype": d, "step_s": s} for k, (d, s) in
                                                            rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
