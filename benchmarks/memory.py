"""Peak extra memory of one sampling step at the real vocabulary ([1, 256, 262144] head outputs), per sampler.

    python benchmarks/memory.py [--vocab 262144] [--canvas 256] [--device cpu] [--json-out F]

Each strategy of `dgemma.sampler` (`FastSampler` for fp32 and bf16 weights, `ReferenceSampler`) runs two steps on
the same precomputed head output; the second, steady-state step is measured (its self-conditioning buffer exists
already, as in generate()). The head output is not counted: generate() holds it anyway. Reported in MiB and as a
multiple of one fp32 [1, C, V] tensor.

On CPU the measurement is the process's high-water mark: /proc/self/clear_refs <- 5 resets VmHWM to the current
RSS, and VmHWM - VmRSS-before is the block's peak extra memory (Linux only). On CUDA it is max_memory_allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from dgemma.model import DiffusionGemma
from dgemma.sampler import FastSampler, ReferenceSampler, temperature

MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas measure new memory."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak extra memory of a block, in MiB (`.extra_mib`; None where it cannot be measured)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.extra_mib: float | None = None
        self.base: int | None = None

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            self.base = _status_kib("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        elif self.base is not None:
            hwm = _status_kib("VmHWM")
            self.extra_mib = (hwm - self.base) / 1024 if hwm is not None else None
        return False


class _Head:
    """Stands in for the model around a sampler strategy: its head output is precomputed, the fp32 softcap is the
    model's own `lm_head`."""

    lm_head = DiffusionGemma.lm_head

    def __init__(self, raw: torch.Tensor, cap: float):
        self.raw, self.device, self.dtype = raw, raw.device, raw.dtype
        self.config = SimpleNamespace(canvas_length=raw.shape[1], vocab_size=raw.shape[2],
                                      final_logit_softcapping=cap)

    def lm_head_raw(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.raw


def sampler_memory(device: torch.device | str = "cpu", vocab: int = 262144, canvas: int = 256, seed: int = 0,
                   cap: float = 30.0) -> dict:
    """Peak extra memory and time of a steady-state sampling step, per strategy and weight dtype."""
    device = torch.device(device)
    tensor_mib = canvas * vocab * 4 / MIB
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(1, canvas, vocab, generator=gen, device=device).mul_(8.0)
    temp = temperature(6, 8, 0.4, 0.8)
    live = torch.ones(1, dtype=torch.bool, device=device)
    out: dict = {"vocab": vocab, "canvas": canvas, "batch": 1, "logits_tensor_mib": tensor_mib}
    for name, dtype, make in (("fast_fp32", torch.float32, lambda m: FastSampler(m, [seed])),
                              ("fast_bf16", torch.bfloat16, lambda m: FastSampler(m, [seed])),
                              ("reference_rng", torch.float32, lambda m: ReferenceSampler(m, seed))):
        head = _Head(base.to(dtype, copy=True), cap)
        hidden = torch.zeros(1, canvas, 1, dtype=dtype, device=device)  # read only for its dtype / shape
        sampler = make(head)
        canvas_ids = sampler.init_canvas(live)
        sampler.step(hidden, canvas_ids, live, temp)  # step 1 allocates the self-conditioning buffer
        held = sum(t.numel() * t.element_size() for t in sampler.self_conditioning().values()) / MIB
        with PeakMemory(device) as pm:
            t0 = time.perf_counter()
            sampler.step(hidden, canvas_ids, live, temp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        out[name] = {"input_dtype": str(dtype).removeprefix("torch."), "peak_extra_mib": pm.extra_mib,
                     "seconds": seconds, "self_conditioning_mib": held,
                     "multiple_of_logits": pm.extra_mib / tensor_mib if pm.extra_mib is not None else None}
        del head, sampler, hidden, canvas_ids
        _trim()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    r = sampler_memory(args.device, args.vocab, args.canvas, args.seed)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    print(f"sampler at V={r['vocab']}, canvas {r['canvas']}, batch 1 (one fp32 logits tensor = "
          f"{r['logits_tensor_mib']:.0f} MiB), steady-state step:")
    for name in ("fast_fp32", "fast_bf16", "reference_rng"):
        e = r[name]
        extra = "-" if e["peak_extra_mib"] is None else f"{e['peak_extra_mib']:.0f}"
        mult = "-" if e["multiple_of_logits"] is None else f"{e['multiple_of_logits']:.2f}"
        print(f"  {name}: peak extra {extra} MiB = {mult}x the logits (besides the {e['self_conditioning_mib']:.0f} "
              f"MiB self-conditioning buffer it holds), {e['seconds'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
