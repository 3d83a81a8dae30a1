"""What the benchmarks measure with: the machine's matmul peak at a model's shapes, a device-synchronised clock, and
one timed generate call (a timestamp at the end of every denoising step). Shared by `dgemma bench` (bench.py), the
quantized full-size bench (bench/fullsize.py) and the scripts in benchmarks/."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import ModelConfig
from ..generate import Done, Draft


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_gemms(cfg: ModelConfig, device: torch.device) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) GEMMs for the peak: the model's own shapes and a square one (on CPU no larger than the model
    warrants: a 2048 square takes a minute in bf16 on CPUs without native bf16)."""
    c, h, i = cfg.canvas_length, cfg.hidden_size, cfg.intermediate_size
    vcap = cfg.vocab_size if device.type == "cuda" else min(cfg.vocab_size, 65536)
    vname = "V" if vcap == cfg.vocab_size else f"{vcap}"
    per_expert = max(1, math.ceil(c * cfg.top_k_experts / cfg.num_experts))
    square = 8192 if device.type == "cuda" else min(2048, 8 * h)
    return [
        (f"lm_head [C x H] @ [H x {vname}]", c, h, vcap),
        (f"sc soft-embed [C x {vname}] @ [{vname} x H]", c, vcap, h),
        ("dense MLP [C x H] @ [H x I]", c, h, i),
        ("expert gate_up [C*k/E x H] @ [H x 2*I_moe]", per_expert, h, 2 * cfg.moe_intermediate_size),
        (f"square {square}", square, square, square),
    ]


def measure_peak(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, budget_s: float = 0.25) -> dict:
    """Best GFLOP/s of torch.mm over `peak_gemms`, each repeated for about `budget_s` (at least 3 calls after a
    warm-up); the fastest single call counts."""
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, m, k, n in peak_gemms(cfg, device):
        a = torch.randn(m, k, generator=gen, device=device).to(dtype)
        b = torch.randn(k, n, generator=gen, device=device).to(dtype)
        out = torch.empty(m, n, dtype=dtype, device=device)
        torch.mm(a, b, out=out)  # warm-up
        best, spent, calls = float("inf"), 0.0, 0
        while (calls < 3 or spent < budget_s) and calls < 1000:
            t, _ = timed(lambda: torch.mm(a, b, out=out), device)
            best, spent, calls = min(best, t), spent + t, calls + 1
        rows.append({"gemm": name, "m": m, "k": k, "n": n, "seconds": best, "gflops": 2 * m * k * n / best / 1e9})
        del a, b, out
    best_row = max(rows, key=lambda r: r["gflops"])
    return {"gflops": best_row["gflops"], "best_gemm": best_row["gemm"], "gemms": rows}


class Clock:
    """Timestamps of one generate call: prefill start / end and the end of every denoising step (synchronised
    with the device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prefill_start: float | None = None
        self.prefill_end: float | None = None
        self.steps: list[float] = []

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def record(self) -> dict:
        steps = self.steps
        return {
            "prefill_s": self.prefill_end - self.prefill_start,
            "first_step_s": steps[0] - self.prefill_end,
            "step_s": (steps[-1] - steps[0]) / (len(steps) - 1),
            "step_intervals_s": [b - a for a, b in zip(steps, steps[1:])],
        }


def run_timed(model, prompt, canvas: int, steps: int, seed: int, rng: str, clock: Clock):
    """model.stream() (what generate() runs), with a timestamp at every Draft (the end of a denoising step)."""
    done = None
    for ev in model.stream(prompt, max_new_tokens=canvas, seed=seed, max_denoising_steps=steps,
                           stability_threshold=None, confidence_threshold=None, rng=rng):
        if isinstance(ev, Draft):
            clock.steps.append(clock.now())
        elif isinstance(ev, Done):
            done = ev
    res = done.results[0]
    # Prefill from the stream's own timer (cache setup + encoder pass). Its denoise timer runs from the end of the
    # prefill to the end of the last step, so the first step (canvas init + step 1) is what precedes the steps
    # timed here.
    first = res.timings["denoise_s"] - (clock.steps[-1] - clock.steps[0])
    clock.prefill_end = clock.steps[0] - first
    clock.prefill_start = clock.prefill_end - res.timings["prefill_s"]
    return res
