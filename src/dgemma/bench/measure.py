"""What the benchmarks measure with: the machine's matmul peak at a model's shapes, a device-synchronised clock, and
one timed generate call (a timestamp at the end of every denoising step), and single decoder passes over a canvas
or a part of it (what a step-cache pass computes), and the routing a trained model's experts see (`spread_routing`).
Shared by `dgemma bench` (bench.py), the
quantized full-size bench (bench/fullsize.py) and the scripts in benchmarks/."""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import ModelConfig, StepCachePolicy
from ..generate import Done, Draft, unsettled_positions
from ..model import Router
from ..numerics import row_invariant


@contextlib.contextmanager
def spread_routing(model, seed: int = 0) -> Iterator[None]:
    """Within the block, every router sends each token to top_k distinct experts drawn uniformly at random, as a
    trained model's load-balanced router spreads a canvas over all its experts (about canvas x top_k / experts rows
    each). A random checkpoint's router does not: its hidden states share one large direction (deeper layers more
    so, and a near-uniform self-conditioning input adds one more), so a 256-position canvas of the 26B-A4B goes to
    8-60 of the 128 experts, one of them taking most rows, which turns the experts' work into a few large matmuls
    that stream a fraction of the codes: faster than a real model's step. The router's own work (projection,
    softmax) still runs; the weights are its probabilities at the drawn experts, normalised as `Router` does."""
    gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probabilities(x)
        drawn = torch.rand(probs.shape, generator=gen).topk(self.top_k, dim=-1).indices
        return self.weigh(probs, drawn.to(probs.device))

    routers = [m for m in model.module.modules() if isinstance(m, Router)]
    for r in routers:
        r.forward = types.MethodType(forward, r)
    try:
        yield
    finally:
        for r in routers:
            del r.forward  # the class's forward again


ROUTINGS = ("spread", "own")  # a benchmark's routing: `spread_routing`, or the checkpoint's own router


def routed(model, routing: str, seed: int = 0) -> contextlib.AbstractContextManager:
    """The routing a benchmark times under: "spread" (`spread_routing`, for random checkpoints) or "own"."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    return spread_routing(model, seed) if routing == "spread" else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """The shortest wall time of `repeats` calls of fn (CPU work: no device sync), after one untimed call unless
    `warmup` is False."""
    if warmup:
        fn()
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


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
            t, _ = timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device)
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


class PassTimer:
    """One decoder pass (decoder + LM head) over a random canvas after a prefill, timed: over every position, or
    over the unsettled ones only (what a step-cache pass computes). The first pass, over every position, leaves all
    K/V in the cache's scratch, as a refresh pass does."""

    @torch.inference_mode()
    def __init__(self, model, prompt_len: int = 64, seed: int = 0):
        self.net, cfg = model.module, model.config
        self.canvas_length = c = cfg.canvas_length
        self.gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=self.gen)
        self.cache = self.net.new_cache(1, prompt_len, scratch=c)
        self.net.encode(prompt, self.cache)
        self.canvas = torch.randint(3, cfg.vocab_size, (1, c), generator=self.gen)
        self.probs = torch.softmax(torch.randn(1, c, cfg.vocab_size, generator=self.gen), -1).to(model.dtype)
        self(None)  # warm-up

    def positions(self, settled: int) -> torch.Tensor:
        """A step-cache pass's positions when `settled` random positions of the canvas have settled."""
        active = torch.ones(1, self.canvas_length, dtype=torch.bool)
        active[0, torch.randperm(self.canvas_length, generator=self.gen)[:settled]] = False
        return unsettled_positions(active)

    @torch.inference_mode()
    def __call__(self, positions: torch.Tensor | None, top_k: int | None = None) -> float:
        t = time.perf_counter()
        with row_invariant():  # the arithmetic generation runs under the default sampler
            self.net.lm_head_raw(self.net.decode_hidden(self.canvas, self.cache, sc_probs=self.probs,
                                                        positions=positions, sc_top_k=top_k))
        return time.perf_counter() - t


def step_cache_schedule(policy: StepCachePolicy, canvas: int, tokens_per_pass: float) -> list[int | None]:
    """The settled positions at each pass of one canvas decoded at `tokens_per_pass`, in the case the cache is
    built for: every accepted token keeps its value. None: a pass over every position (the canvas's first pass and
    every `refresh`-th, as generate's denoising loop runs them). A token accepted at pass j has stayed the same for
    `settle` passes in a row after pass j + settle - 1, so passes from j + settle on skip it."""
    out: list[int | None] = []
    for i in range(math.ceil(canvas / tokens_per_pass)):
        accepted_passes = i - policy.settle + 1  # passes 0 .. i - settle accepted tokens that have settled by pass i
        out.append(None if i % policy.refresh == 0 else min(canvas, int(tokens_per_pass * max(0, accepted_passes))))
    return out


def step_cache_trajectory(timer: PassTimer, policy: StepCachePolicy, tokens_per_pass: float) -> dict:
    """Time every pass of `step_cache_schedule` (each once, in order); the ratio is their total over as many exact
    passes over every position, timed two before and two after the trajectory and, when the policy's refresh
    passes are exact (no top-k input), those too."""
    schedule = step_cache_schedule(policy, timer.canvas_length, tokens_per_pass)
    full = [timer(None), timer(None)]
    times = []
    for settled in schedule:
        t = timer(None if settled is None else timer.positions(settled), policy.sc_top_k)
        times.append(t)
        if settled is None and policy.sc_top_k is None:
            full.append(t)
    full += [timer(None), timer(None)]
    full_s = sum(full) / len(full)
    return {"tokens_per_forward": tokens_per_pass, "passes": len(schedule), "settled": schedule,
            "pass_s": times, "full_pass_s": full_s, "full_pass_min_s": min(full),
            "ratio": sum(times) / (len(times) * full_s)}
