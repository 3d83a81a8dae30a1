"""Where a quantized 26B-A4B step's time and memory go, on a slice of the model that fits anywhere.

Writes (once) a random checkpoint with the full 26B-A4B widths and vocabulary but `--layers` layers (default 2:
one sliding, one full), in the scheme's layout (`dgemma random-checkpoint --quantize`), loads it with default
settings, and reports:
- memory after load: VmRSS split into anonymous and file-mapped pages, the peak (VmHWM), and the bytes the model
  holds (packed weights + dense parameters), so any copy beyond the model's own bytes shows up;
- one generate call at `--steps` denoising steps, timed per module kind with forward hooks (attention, dense MLP,
  router, experts, self-conditioning MLP) and per head piece (tied LM head, soft embedding, sampler), per step.
A full-size step costs about (30 / layers) x the per-layer part + the head part.

    OMP_NUM_THREADS=2 python benchmarks/profile_quant.py --scheme int4 [--layers 2] [--steps 3] [--fp32-compute]

`--fp32-compute` pretends the CPU has no native bf16 (as on AVX2 / AVX-512F-only CPUs): activations fp32, 16-bit
weights expanded per matmul.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def proc_status() -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process in GiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / (1 << 20)
    return out


def model_bytes(model: torch.nn.Module) -> int:
    from dgemma.quant.qtensor import QTensor

    total = sum(p.numel() * p.element_size() for p in model.module.parameters())
    for mod in model.module.modules():
        for v in vars(mod).values():
            if isinstance(v, QTensor):
                total += v.nbytes
    return total


class Timer:
    """Accumulates wall time per label (module forward hooks, wrapped functions)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}

    def hook(self, module: torch.nn.Module, label: str) -> None:
        def pre(mod, args):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.total[label] += time.perf_counter() - self._start.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t

        setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="int4", choices=["int8", "int4", "fp8", "nvfp4"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--dir", help="checkpoint directory (default /tmp/dgemma-profile/26b-a4b-L{layers}-{scheme})")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--fp32-compute", action="store_true", help="pretend the CPU has no native bf16")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    from dgemma import hardware
    from dgemma.checkpoint.load import load_model
    from dgemma.model import Attention, Router
    from dgemma.presets import FULL, SLIDING
    from dgemma.quant import lowbit
    from dgemma.quant.modules import QExperts
    from dgemma.checkpoint.quantize import random_quantized_checkpoint
    import dgemma.sampler as sampler_mod

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fp32_compute:
        hardware.cpu_flags.cache_clear()
        flags = hardware.cpu_flags() - {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16"}
        hardware.cpu_flags = lambda: flags  # type: ignore[assignment]
    path = Path(args.dir or f"/tmp/dgemma-profile/26b-a4b-L{args.layers}-{args.scheme}")
    if not (path / "config.json").is_file():
        types = ([SLIDING] * (args.layers - 1) + [FULL])
        random_quantized_checkpoint(path, "26b-a4b", args.scheme, dtype="bfloat16", group=64, progress=False,
                                    num_hidden_layers=args.layers, layer_types=types)
    before = proc_status()
    t0 = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t0
    after = proc_status()
    held = model_bytes(model) / (1 << 30)

    timer = Timer()
    for layer in model.module.layers:
        for mod in layer.modules():
            if isinstance(mod, Attention):
                timer.hook(mod, "attention")
            elif isinstance(mod, Router):
                timer.hook(mod, "router")
            elif isinstance(mod, QExperts) or type(mod).__name__ == "Experts":
                timer.hook(mod, "experts")
        timer.hook(layer.mlp, "dense mlp")
    timer.hook(model.module.sc_mlp, "sc mlp")
    timer.wrap(model.module.embed_tokens, "head", "lm head")
    timer.wrap(model.module.embed_tokens, "soft", "sc soft embedding")
    timer.wrap(sampler_mod, "fast_sample", "sampler")

    cfg = model.config
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=cfg.canvas_length, max_denoising_steps=args.steps, seed=0,
                   stability_threshold=None, confidence_threshold=None)
    gen_s = time.perf_counter() - t0
    end = proc_status()
    per_step = {k: v / args.steps for k, v in sorted(timer.total.items(), key=lambda kv: -kv[1])}
    layer_part = sum(v for k, v in per_step.items() if k in ("attention", "router", "experts", "dense mlp"))
    head_part = sum(v for k, v in per_step.items() if k not in ("attention", "router", "experts", "dense mlp"))
    result = {
        "scheme": args.scheme, "layers": args.layers, "steps": args.steps, "machine": hardware.describe(),
        "compute_dtype": str(model.dtype), "fp32_compute_forced": args.fp32_compute,
        "kernel_mode": lowbit.MODE["kernel"], "load_s": load_s, "model_gib": held,
        "memory_gib": {"before_load": before, "after_load": after, "after_generate": end},
        "generate_s": gen_s, "per_step_s": per_step,
        "full_size_estimate_step_s": layer_part / args.layers * 30 + head_part,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
