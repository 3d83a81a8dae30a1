"""`dgemma bench`: dgemma against the transformers reference on the same random weights, in one run.

For a named preset (`dgemma.presets.PRESETS`) this measures, at batch 1 with a fixed number of denoising steps and
adaptive stopping off:

- prefill time and the time of one full denoising step (decoder forward + sampling + acceptance + renoise) for the
  reference and for dgemma (fp32: rng="reference" and rng="fast"; bf16: rng="fast"), tokens/s at a stated
  tokens-per-forward, and the speed ratio reference / dgemma;
- the achieved FLOP/s of a denoising step (FLOPs counted analytically from the config, see `decoder_flops`) against
  this machine's matmul peak, measured in the same run for each dtype (`measure_peak`);
- peak RSS, and the peak extra memory of the sampler at the real vocabulary ([1, 256, 262144] fp32 logits);
- agreement: fp32 tokens (dgemma rng="reference" vs the reference's generate after torch.manual_seed), and the
  max / mean |logit difference| of one denoising step (bf16 against a stated tolerance; fp32 too).

transformers is the test oracle and is imported lazily here only; without it (or for presets too big to write a
checkpoint for, e.g. 26b-a4b) the reference is skipped with a note and dgemma runs on random weights built directly
in memory (`random_model`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import resolve_dtype
from .config import GenerationConfig, ModelConfig
from .presets import PRESETS, config_dict, generation_config_dict

REAL_VOCAB = 262144
REAL_CANVAS = 256
REAL_TOKENS_PER_FORWARD = 16.0  # ~accepted tokens per decoder pass of the real 26B-A4B model (DESIGN.md §4)
# bf16 logits tolerance, the same as tests/test_parity.py: a faithful port agrees bit for bit; allow 4 bf16 ulps at
# the top of the softcapped range (max) and < 1 ulp of a typical logit on average (mean).
BF16_MAX_TOL, BF16_MEAN_TOL = 0.5, 0.02
FP32_MAX_TOL = 1e-5
# The reference is run from a checkpoint written to a temporary directory: skip it above this fp32 size.
REFERENCE_MAX_CHECKPOINT_BYTES = 8 << 30
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# Random weights in memory
# ---------------------------------------------------------------------------------------------------------------
def model_config(preset: str | dict[str, Any], dtype: str = "float32", **overrides: Any) -> ModelConfig:
    return ModelConfig.from_dict(config_dict(preset, dtype=dtype, **overrides), f"preset {preset!r}")


def random_model(preset: str | dict[str, Any] = "tiny", dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02, **overrides: Any):
    """A `DiffusionGemma` with random weights, built directly in memory on `device` (no checkpoint on disk).

    Matrices are N(0, std), every 1-D weight (norms, scales, layer scalars) is 1, drawn in fp32 in parameter order
    from one generator seeded with `seed` and then cast: on CPU this is exactly the model that
    `load_model(write_random_checkpoint(dir, preset, seed=seed, std=std), dtype=dtype)` returns. Only one fp32
    tensor exists at a time beside the model, so a model that fits in `dtype` can be built."""
    from .model import DiffusionGemma

    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    cfg = model_config(preset, DTYPE_NAMES[dtype], **overrides)
    _check_fits(cfg, dtype, device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if p.dim() == 1:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(p.shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
            state[name] = t if dtype == torch.float32 else t.to(dtype)
            del t
    model.load_state_dict(state, assign=True, strict=True)
    del state
    model.requires_grad_(False)
    model.eval()
    model.generation_config = GenerationConfig.from_dict(generation_config_dict())
    model.source = f"random:{preset if isinstance(preset, str) else 'custom'}"
    return model


def _check_fits(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    need = cfg.num_params * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"free memory on {device}"
    else:
        free = _meminfo().get("MemAvailable", 0) * 1024
        where = "available host memory"
    if free and need > 0.9 * free:
        raise MemoryError(f"{cfg.num_params / 1e9:.2f} G parameters need {need / 2**30:.1f} GiB in "
                          f"{DTYPE_NAMES[dtype]}, more than the {free / 2**30:.1f} GiB of {where}")


# ---------------------------------------------------------------------------------------------------------------
# Analytic FLOPs
# ---------------------------------------------------------------------------------------------------------------
def decoder_flops(cfg: ModelConfig, cached: int, canvas: int | None = None, self_conditioning: bool = True,
                  batch: int = 1) -> dict[str, int]:
    """FLOPs (2 x multiply-accumulates) of one denoising forward over a canvas, by component.

    Counted: every projection for the canvas tokens (q, k, v on sliding layers only since full layers reuse K as V,
    o), attention QK^T and PV over [cache ; canvas] keys (sliding layers see at most sliding_window - 1 cached
    positions), the dense MLP (gate, up, down), the router, the top-k experts (gate_up + down per chosen expert),
    self-conditioning (softmax(logits) [C x V] @ [V x H] and its MLP, only when `self_conditioning`), and the tied
    lm_head. Not counted: norms, RoPE, softmaxes, GELU, the softcap and the sampler (elementwise, O(C x V))."""
    c = (canvas if canvas is not None else cfg.canvas_length) * batch
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh = cfg.num_attention_heads
    mac = dict.fromkeys(("attn_proj", "attn_scores", "dense_mlp", "router", "experts", "sc_soft_embed", "sc_mlp",
                         "lm_head"), 0)
    for spec in cfg.layers:
        q, kv = nh * spec.head_dim, spec.num_kv_heads * spec.head_dim
        mac["attn_proj"] += c * h * (q + kv * (2 if spec.has_v_proj else 1)) + c * q * h
        keys = (min(cached, cfg.sliding_window - 1) if spec.sliding else cached) + c // batch
        mac["attn_scores"] += 2 * c * nh * keys * spec.head_dim  # QK^T and PV
        mac["dense_mlp"] += 3 * c * h * i
        mac["router"] += c * h * cfg.num_experts
        mac["experts"] += 3 * c * cfg.top_k_experts * cfg.moe_intermediate_size * h
    if self_conditioning:
        mac["sc_soft_embed"] = c * v * h
        mac["sc_mlp"] = 3 * c * h * i
    mac["lm_head"] = c * h * v
    out = {k: 2 * n for k, n in mac.items()}
    out["total"] = sum(out.values())
    return out


def prefill_flops(cfg: ModelConfig, length: int, batch: int = 1) -> int:
    """FLOPs of the encoder pass over a prompt: projections, dense MLP, router, top-k experts, and causal attention
    (query j sees j + 1 keys, at most sliding_window on sliding layers). No lm_head (prefill only fills the cache)."""
    h, i, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    total = 0
    for spec in cfg.layers:
        q, kv = nh * spec.head_dim, spec.num_kv_heads * spec.head_dim
        total += length * h * (q + kv * (2 if spec.has_v_proj else 1)) + length * q * h
        w = cfg.sliding_window if spec.sliding else length
        keys = sum(min(j + 1, w) for j in range(length))
        total += 2 * nh * keys * spec.head_dim
        total += 3 * length * h * i + length * h * cfg.num_experts
        total += 3 * length * cfg.top_k_experts * cfg.moe_intermediate_size * h
    return 2 * total * batch


# ---------------------------------------------------------------------------------------------------------------
# Machine: matmul peak, memory
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def peak_gemms(cfg: ModelConfig, device: torch.device) -> list[tuple[str, int, int, int]]:
    """(name, m, k, n) GEMMs for the peak: the model's own shapes and a large square one."""
    c, h, i = cfg.canvas_length, cfg.hidden_size, cfg.intermediate_size
    vcap = cfg.vocab_size if device.type == "cuda" else min(cfg.vocab_size, 65536)
    vname = "V" if vcap == cfg.vocab_size else f"{vcap}"
    per_expert = max(1, math.ceil(c * cfg.top_k_experts / cfg.num_experts))
    square = 8192 if device.type == "cuda" else 2048
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
        while calls < 3 or spent < budget_s:
            t, _ = _timed(lambda: torch.mm(a, b, out=out), device)
            best, spent, calls = min(best, t), spent + t, calls + 1
            if calls >= 1000:
                break
        rows.append({"gemm": name, "m": m, "k": k, "n": n, "seconds": best, "gflops": 2 * m * k * n / best / 1e9})
        del a, b, out
    best_row = max(rows, key=lambda r: r["gflops"])
    return {"gflops": best_row["gflops"], "best_gemm": best_row["gemm"], "gemms": rows}


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+)", text, re.M)}


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


_HWM_SEEN_KIB = [0]  # the largest VmHWM seen before a reset: the process peak survives the resets


def _reset_hwm() -> bool:
    _HWM_SEEN_KIB[0] = max(_HWM_SEEN_KIB[0], _status_kib("VmHWM") or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """The process's peak resident set size so far (across the high-water-mark resets of this module)."""
    kib = max(_HWM_SEEN_KIB[0], _status_kib("VmHWM") or 0)
    return kib / 1024 if kib else None


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS deltas measure new memory."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakMemory:
    """Peak extra memory of a block: VmHWM - VmRSS on CPU (high-water mark reset on entry), or
    max_memory_allocated - memory_allocated on CUDA. `.extra_mib` is None when it cannot be measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_mib: float | None = None

    def __enter__(self):
        _trim()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _status_kib("VmRSS") if _reset_hwm() else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        elif self.base is not None:
            hwm = _status_kib("VmHWM")
            self.extra_mib = (hwm - self.base) / 1024 if hwm is not None else None
        return False


def sampler_memory(device: torch.device, vocab: int = REAL_VOCAB, canvas: int = REAL_CANVAS, seed: int = 0,
                   cap: float = 30.0) -> dict:
    """Peak extra memory and time of one sampling step on [1, canvas, vocab] head outputs, in MiB and as a multiple
    of one fp32 [1, canvas, vocab] tensor. The head output and the self-conditioning buffer exist before the call
    (generate() holds them anyway) and are not counted; the buffer's size is reported as `persistent_mib`.

    - fast_fp32 / fast_bf16: `fast_sample` as generate()'s rng="fast" path calls it for fp32 / bf16 weights (raw
      head output in the weight dtype, softcap + temperature + softmax + entropy + draw fused per chunk, the
      softmax written into the [1, C, V] self-conditioning buffer of the weight dtype);
    - reference_rng: the ops of generate()'s rng="reference" path, which are the reference's own (fp32 softcap,
      temperature, softmax, multinomial, argmax, entropy)."""
    from .sampler import ReferenceRNG, accept_mask, entropy, fast_sample, temperature

    tensor_mib = canvas * vocab * 4 / MIB
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(1, canvas, vocab, generator=gen, device=device).mul_(8.0)
    temp = temperature(8, 8, 0.4, 0.8)
    rows = torch.ones(1, dtype=torch.bool, device=device)
    u = torch.rand(1, canvas, generator=gen, device=device, dtype=torch.float64)
    out: dict[str, Any] = {"vocab": vocab, "canvas": canvas, "batch": 1, "logits_tensor_mib": tensor_mib}

    def reference_path(raw, _buf):
        rand = ReferenceRNG(seed, device)
        logits = torch.tanh(raw.float() / cap) * cap  # the head's softcap (model.lm_head)
        logits = logits / temp
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        sampled = rand.sample(probs.view(-1, vocab)).view(1, canvas)
        del probs
        argmax = logits.argmax(dim=-1)
        h = entropy(logits)
        return sampled, argmax, accept_mask(h, 0.1)

    def fast_path(raw, buf):
        return fast_sample(raw, cap, temp, u, rows, buf)

    for name, dtype, fn in (("fast_fp32", torch.float32, fast_path), ("fast_bf16", torch.bfloat16, fast_path),
                            ("reference_rng", torch.float32, reference_path)):
        raw = base.to(dtype, copy=True)
        buf = torch.zeros_like(raw) if fn is fast_path else None
        with _PeakMemory(device) as pm:
            seconds, res = _timed(lambda: fn(raw, buf), device)
        del res, raw
        out[name] = {"input_dtype": DTYPE_NAMES[dtype], "peak_extra_mib": pm.extra_mib, "seconds": seconds,
                     "multiple_of_logits": pm.extra_mib / tensor_mib if pm.extra_mib is not None else None,
                     "persistent_mib": buf.numel() * buf.element_size() / MIB if buf is not None else 0.0}
        del buf
    del base
    _trim()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The reference (optional)
# ---------------------------------------------------------------------------------------------------------------
def _reference_class() -> tuple[Any, str | None]:
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError as e:  # also: transformers too old to have the model
        return None, f"transformers is not installed or lacks DiffusionGemma ({e}); reference skipped"
    return DiffusionGemmaForBlockDiffusion, None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the reference's load report and progress bars while loading."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        yield
        return
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _load_reference(cls, ckpt: Path, dtype: torch.dtype, device: torch.device):
    with _quiet_transformers():
        ref = cls.from_pretrained(str(ckpt), dtype=dtype)
    return ref.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Timing one mode
# ---------------------------------------------------------------------------------------------------------------
class _Clock:
    """Timestamps of one generate call: prefill start / end and the end of every denoising step (synchronised
    with the device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prefill_start: float | None = None
        self.prefill_end: float | None = None
        self.steps: list[float] = []

    def now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def record(self) -> dict:
        steps = self.steps
        n = len(steps)
        return {
            "prefill_s": self.prefill_end - self.prefill_start,
            "first_step_s": steps[0] - self.prefill_end,
            "step_s": (steps[-1] - steps[0]) / (n - 1),
            "step_intervals_s": [b - a for a, b in zip(steps, steps[1:])],
        }


class _DraftStreamer:
    """A draft-capable streamer for the reference's generate: put_draft is called after every denoising step."""

    def __init__(self, clock: _Clock):
        self.clock = clock

    def put(self, value) -> None:
        pass

    def put_draft(self, value=None, logits=None) -> None:
        self.clock.steps.append(self.clock.now())

    def end(self) -> None:
        pass


def _run_dgemma(model, prompt, canvas: int, steps: int, seed: int, rng: str, clock: _Clock):
    """model.stream() (what generate() runs), with a timestamp at every Draft (the end of a denoising step)."""
    from .generate import Done, Draft

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


def _run_reference(ref, prompt, canvas: int, steps: int, seed: int, clock: _Clock):
    """The reference's generate after torch.manual_seed(seed); its encoder forward (the prefill) is timed with
    hooks, every denoising step through a draft streamer."""
    enc = ref.model.encoder

    def pre(module, args, kwargs):
        if clock.prefill_start is None:
            clock.prefill_start = clock.now()

    def post(module, args, kwargs, output):
        if clock.prefill_end is None:
            clock.prefill_end = clock.now()

    handles = [enc.register_forward_pre_hook(pre, with_kwargs=True),
               enc.register_forward_hook(post, with_kwargs=True)]
    try:
        torch.manual_seed(seed)
        with torch.inference_mode():
            return ref.generate(prompt, max_new_tokens=canvas, max_denoising_steps=steps, stability_threshold=None,
                                confidence_threshold=None, streamer=_DraftStreamer(clock))
    finally:
        for h in handles:
            h.remove()


def _time_mode(run, steps: int, repeats: int, device: torch.device, min_time_s: float = 0.0) -> dict:
    """Time `run(steps, clock)` (one generate call) after a warm-up: at least `repeats` runs, more while less than
    `min_time_s` has been spent (up to 100). Per run: wall time, prefill (the encoder pass), and the steady-state
    step = (end of step N - end of step 1) / (N - 1) (steps 2..N, each a full step with self-conditioning).
    Interference from other processes only adds time, so the best run counts. Returns the numbers and the output
    of the last run."""
    run(2, _Clock(device))  # warm-up (allocator, kernels, thread pools)
    runs = []
    out = None
    spent = 0.0
    with _PeakMemory(device) as pm:
        while len(runs) < repeats or (spent < min_time_s and len(runs) < 100):
            clock = _Clock(device)
            wall, out = _timed(lambda: run(steps, clock), device)
            if len(clock.steps) != steps:
                raise RuntimeError(f"expected {steps} denoising steps, saw {len(clock.steps)} (adaptive stopping on?)")
            runs.append({"wall_s": wall, **clock.record()})
            spent += wall
    best = {k: min(r[k] for r in runs) for k in ("wall_s", "prefill_s", "first_step_s", "step_s")}
    return {**best, "step_s_median": statistics.median(r["step_s"] for r in runs),
            "prefill_s_median": statistics.median(r["prefill_s"] for r in runs), "runs": len(runs),
            "step_s_all": [r["step_s"] for r in runs], "prefill_s_all": [r["prefill_s"] for r in runs],
            "generate_peak_extra_mib": pm.extra_mib, "output": out}


def _ref_ids(out, prompt_len: int, pad: int | None) -> list[int]:
    row = out.sequences[0, prompt_len:]
    if pad is not None:
        row = row[row != pad]
    return row.tolist()


def _logit_diff(got: torch.Tensor, want: torch.Tensor) -> dict:
    d = (got.float().cpu() - want.float().cpu()).abs()
    finite = bool(torch.isfinite(d).all())
    return {"max_abs_diff": float(d.max()) if finite else None, "mean_abs_diff": float(d.mean()) if finite else None,
            "finite": finite}


def _compare_logits(model, ref, prompt: torch.Tensor, canvas: torch.Tensor,
                    dtype: torch.dtype) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """One denoising step's logits, dgemma canvas_logits vs the reference forward: without self-conditioning, and
    with the reference's first logits (rounded to the weight dtype) as self-conditioning input. Returns the
    comparison and the (dgemma, reference) logits without self-conditioning, on CPU."""
    with torch.inference_mode():
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        sc = want.to(dtype).float()
        want_sc = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    got = model.canvas_logits(prompt, canvas)
    got_sc = model.canvas_logits(prompt, canvas, sc)
    plain, with_sc = _logit_diff(got, want), _logit_diff(got_sc, want_sc)
    if dtype == torch.float32:
        tol = {"max_abs_diff": FP32_MAX_TOL}
    else:
        tol = {"max_abs_diff": BF16_MAX_TOL, "mean_abs_diff": BF16_MEAN_TOL}
    ok = True
    for d in (plain, with_sc):
        ok = ok and d["finite"] and all(d[k] is not None and d[k] <= v for k, v in tol.items())
    finite = plain["finite"] and with_sc["finite"]
    return {
        "max_abs_diff": max(plain["max_abs_diff"], with_sc["max_abs_diff"]) if finite else None,
        "mean_abs_diff": max(plain["mean_abs_diff"], with_sc["mean_abs_diff"]) if finite else None,
        "finite": finite, "tolerance": tol, "within_tolerance": ok,
        "no_self_conditioning": plain, "self_conditioning": with_sc,
    }, (got.float().cpu(), want.float().cpu())


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def _git_state() -> dict | None:
    """The commit (and whether the tree is dirty) of the source checkout this dgemma runs from, if it is one."""
    import subprocess

    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu = m.group(1).strip()
    try:
        import transformers

        tver = transformers.__version__
    except ImportError:
        tver = None
    info = {
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": tver,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "dgemma_source": _git_state(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _dtype_list(dtypes) -> list[torch.dtype]:
    if isinstance(dtypes, str):
        dtypes = [d for d in dtypes.replace(" ", "").split(",") if d]
    out = []
    for d in dtypes:
        t = resolve_dtype(d)
        if t == torch.float16:
            raise ValueError("bench measures float32 and bfloat16")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("no dtypes to benchmark")
    return out


def run_bench(
    preset: str = "small-moe",
    dtypes=("float32", "bfloat16"),
    steps: int = 8,
    prompt_len: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    reference: bool = True,
    threads: int | None = None,
    repeats: int = 3,
    min_time_s: float = 1.0,
    tokens_per_forward: float = REAL_TOKENS_PER_FORWARD,
    peak_budget_s: float = 0.25,
    measure_sampler_memory: bool = True,
    std: float = 0.02,
    workdir: str | Path | None = None,
) -> dict:
    """Run the benchmark and return a JSON-serialisable dict (see `render`). Batch 1, one canvas
    (max_new_tokens = canvas_length), `steps` denoising steps, adaptive stopping off."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError("steps must be an integer >= 2 (the step time is timed over steps 2..N)")
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    dtype_list = _dtype_list(dtypes)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available in this torch build")
    if threads is not None and threads < 1:
        raise ValueError("threads must be >= 1")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_bench(preset, dtype_list, steps, prompt_len, seed, device, reference, repeats, min_time_s,
                          tokens_per_forward, peak_budget_s, measure_sampler_memory, std, workdir)
    finally:
        torch.set_num_threads(saved_threads)


def _run_bench(preset, dtype_list, steps, prompt_len, seed, device, reference, repeats, min_time_s,
               tokens_per_forward, peak_budget_s, measure_sampler_memory, std, workdir) -> dict:
    cfg = model_config(preset)
    canvas = cfg.canvas_length
    notes: list[str] = []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    result: dict[str, Any] = {
        "preset": preset,
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_experts": cfg.num_experts,
            "top_k_experts": cfg.top_k_experts, "moe_intermediate_size": cfg.moe_intermediate_size,
            "intermediate_size": cfg.intermediate_size, "sliding_window": cfg.sliding_window,
            "canvas_length": canvas, "parameters": cfg.num_params, "active_parameters": cfg.active_params,
        },
        "settings": {"dtypes": [DTYPE_NAMES[d] for d in dtype_list], "steps": steps, "prompt_len": prompt_len,
                     "seed": seed, "batch": 1, "max_new_tokens": canvas, "device": str(device),
                     "threads": torch.get_num_threads(), "repeats": repeats, "min_time_s": min_time_s,
                     "adaptive_stopping": False,
                     "tokens_per_forward_stated": tokens_per_forward, "weight_std": std},
        "machine": machine_info(device),
    }

    # FLOPs
    dec = decoder_flops(cfg, prompt_len, canvas, self_conditioning=True)
    dec0 = decoder_flops(cfg, prompt_len, canvas, self_conditioning=False)
    result["flops"] = {"denoise_step": dec["total"], "denoise_step_first": dec0["total"],
                       "denoise_step_breakdown": dec, "prefill": prefill_flops(cfg, prompt_len)}

    # The reference: available, and small enough to write a checkpoint for?
    ref_cls = None
    if reference:
        ref_cls, why = _reference_class()
        ckpt_bytes = cfg.num_params * 4
        if ref_cls is not None and ckpt_bytes > REFERENCE_MAX_CHECKPOINT_BYTES:
            ref_cls, why = None, (f"preset {preset} is too big for the reference (a {ckpt_bytes / 1e9:.0f} GB fp32 "
                                  f"checkpoint); reference skipped, dgemma runs on random weights built in memory")
        if why:
            notes.append(why)
    else:
        notes.append("reference not requested (--no-reference)")
    result["reference"] = {"ran": ref_cls is not None,
                           "class": "transformers DiffusionGemmaForBlockDiffusion" if ref_cls else None}

    gen = torch.Generator().manual_seed(seed)
    hi = min(cfg.vocab_size, 255999)  # below the image / special ids of the real vocabulary
    prompt = torch.randint(3, hi, (1, prompt_len), generator=gen).to(device)
    probe_canvas = torch.randint(0, cfg.vocab_size, (1, canvas), generator=gen).to(device)

    tmp = None
    ckpt = None
    try:
        if ref_cls is not None:
            from .presets import write_random_checkpoint

            tmp = Path(tempfile.mkdtemp(prefix="dgemma-bench-", dir=workdir))
            ckpt = write_random_checkpoint(tmp / preset, preset, seed=seed, dtype="float32", std=std)
            result["weights"] = "random fp32 checkpoint (write_random_checkpoint), loaded by both sides"
        else:
            result["weights"] = "random, built in memory (bench.random_model)"

        modes: list[dict] = []
        agreement: dict[str, Any] = {}
        probe_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> (dgemma, reference) logits
        for dtype in dtype_list:
            dname = DTYPE_NAMES[dtype]
            try:
                if ckpt is not None:
                    from .checkpoint import load_model

                    model = load_model(ckpt, dtype=dtype, device=device)
                else:
                    model = random_model(preset, dtype, device, seed=seed, std=std)
            except MemoryError as e:  # e.g. 26b-a4b in fp32: skip this dtype, keep the others
                notes.append(f"{dname} skipped: {e}")
                continue
            ref = _load_reference(ref_cls, ckpt, dtype, device) if ref_cls is not None else None
            pad = model.generation_config.pad_token_id
            ref_ids = None
            if ref is not None:
                t = _time_mode(lambda n, ck: _run_reference(ref, prompt, canvas, n, seed, ck), steps, repeats, device,
                               min_time_s)
                out = t.pop("output")
                ref_ids = _ref_ids(out, prompt_len, pad)
                tpf = float(out.tokens_per_forward.reshape(-1)[0])
                modes.append({"impl": "reference", "dtype": dname, "rng": "torch.manual_seed", **t,
                              "tokens": len(ref_ids), "tokens_per_forward": tpf})
            rngs = ["reference", "fast"] if dtype == torch.float32 else ["fast"]
            for rng in rngs:
                t = _time_mode(lambda n, ck, rng=rng: _run_dgemma(model, prompt, canvas, n, seed, rng, ck), steps, repeats,
                               device, min_time_s)
                res = t.pop("output")
                tim = res.timings
                modes.append({"impl": "dgemma", "dtype": dname, "rng": rng, **t, "tokens": len(res.ids),
                              "tokens_per_forward": res.tokens_per_forward,
                              "internal": {"prefill_s": tim["prefill_s"], "denoise_s": tim["denoise_s"],
                                           "total_s": tim["total_s"], "step_s": tim["denoise_s"] / steps}})
                if rng == "reference" and ref_ids is not None:
                    ids = res.ids
                    n = min(len(ids), len(ref_ids))
                    first = next((j for j in range(n) if ids[j] != ref_ids[j]), None)
                    if first is None and len(ids) != len(ref_ids):
                        first = n
                    same = sum(a == b for a, b in zip(ids, ref_ids))
                    agreement.setdefault(dname, {})["tokens"] = {
                        "token_identical": ids == ref_ids, "compared": max(len(ids), len(ref_ids)),
                        "matching": same, "matching_fraction": same / max(1, len(ids), len(ref_ids)),
                        "first_mismatch": first,
                        "note": "dgemma rng='reference' vs reference generate after torch.manual_seed(seed)",
                    }
            if ref is not None:
                agreement.setdefault(dname, {})["logits"], probe_logits[dname] = _compare_logits(
                    model, ref, prompt, probe_canvas, dtype)
            del model, ref
            _trim()

        if "float32" in probe_logits and "bfloat16" in probe_logits:
            # How far bf16 itself moves the logits: both bf16 runs against the fp32 reference (no self-cond.).
            fp32_ref = probe_logits["float32"][1]
            dg16, ref16 = probe_logits["bfloat16"]
            agreement["bfloat16"]["logits"]["scale_vs_fp32_reference"] = {
                "reference_bf16": _logit_diff(ref16, fp32_ref), "dgemma_bf16": _logit_diff(dg16, fp32_ref),
                "mean_abs_logit": float(fp32_ref.abs().mean()),
            }
        del probe_logits

        # Derived numbers.
        if not modes:
            raise MemoryError("; ".join(notes))
        result["peak"] = {}
        for dtype in dtype_list:
            result["peak"][DTYPE_NAMES[dtype]] = measure_peak(cfg, dtype, device, peak_budget_s)
        for m in modes:
            peak = result["peak"][m["dtype"]]["gflops"]
            step = m["step_s"]
            m["name"] = f"{m['impl']} {m['dtype']}" + (f" rng={m['rng']}" if m["impl"] == "dgemma" else "")
            m["valid"] = step > 0
            m["tokens_per_s_stated"] = tokens_per_forward / step if step > 0 else None
            m["tokens_per_s_measured"] = m["tokens_per_forward"] / step if step > 0 else None
            m["tokens_per_s_end_to_end"] = m["tokens"] / m["wall_s"] if m["wall_s"] > 0 else None
            m["step_gflops"] = dec["total"] / step / 1e9 if step > 0 else None
            m["fraction_of_peak"] = m["step_gflops"] / peak if m["step_gflops"] is not None else None
            m["prefill_gflops"] = (result["flops"]["prefill"] / m["prefill_s"] / 1e9 if m["prefill_s"] > 0
                                   else None)
            if step <= 0:
                notes.append(f"{m['name']}: non-positive step time (timer trouble?)")
        for m in modes:
            base = next((r for r in modes if r["impl"] == "reference" and r["dtype"] == m["dtype"]), None)
            if base is not None and m["impl"] == "dgemma" and m["valid"] and base["valid"]:
                m["speedup_vs_reference"] = base["step_s"] / m["step_s"]
                m["prefill_speedup_vs_reference"] = (base["prefill_s"] / m["prefill_s"]
                                                     if m["prefill_s"] > 0 and base["prefill_s"] > 0 else None)
            else:
                m["speedup_vs_reference"] = None
                m["prefill_speedup_vs_reference"] = None
        result["modes"] = modes
        result["agreement"] = agreement

        memory: dict[str, Any] = {"peak_rss_mib": peak_rss_mib()}
        if device.type == "cuda":
            memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        if measure_sampler_memory:
            memory["sampler"] = sampler_memory(device, seed=seed)
        result["memory"] = memory
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["machine"]["loadavg_start"] = list(load_start) if load_start else None
    result["machine"]["loadavg_end"] = list(load_end) if load_end else None
    if load_start and max(load_start[0], load_end[0]) > 1.2 * result["machine"]["usable_cpus"]:
        notes.append(f"the machine was busy (1-min load average {load_start[0]:.1f} -> {load_end[0]:.1f} on "
                     f"{result['machine']['usable_cpus']} CPUs): absolute times are inflated and noisy; "
                     "ratios within this run are more meaningful")
    result["notes"] = notes
    return result


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def _f(x, fmt: str = "{:.3g}", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def render(result: dict, console=None) -> None:
    """Print the benchmark result as rich tables."""
    from rich.console import Console
    from rich.table import Table

    c = console or Console()
    cfg, s, mach = result["config"], result["settings"], result["machine"]
    c.print(f"[bold]dgemma bench[/bold] preset [bold]{result['preset']}[/bold]: {cfg['parameters'] / 1e6:.1f} M "
            f"parameters ({cfg['active_parameters'] / 1e6:.1f} M active), hidden {cfg['hidden_size']}, "
            f"{cfg['num_layers']} layers, {cfg['num_experts']} experts top-{cfg['top_k_experts']}, "
            f"vocab {cfg['vocab_size']}, canvas {cfg['canvas_length']}")
    c.print(f"batch 1, prompt {s['prompt_len']}, {s['steps']} denoising steps (fixed), seed {s['seed']}, "
            f"device {s['device']}, {s['threads']} threads, best of >= {s['repeats']} runs; {mach['cpu']}"
            + (f", {mach['gpu']}" if mach.get("gpu") else ""))
    fl = result["flops"]
    c.print(f"FLOPs per denoise step {fl['denoise_step'] / 1e9:.2f} G (first step, no self-conditioning: "
            f"{fl['denoise_step_first'] / 1e9:.2f} G); prefill {fl['prefill'] / 1e9:.2f} G")

    tpf = s["tokens_per_forward_stated"]
    t = Table(title="denoising speed: step = (end of step N - end of step 1) / (N - 1), prefill = encoder pass; "
                    "best run")
    for col in ("mode", "prefill ms", "step ms", f"tok/s @{tpf:g}/fwd", "tok/s @measured", "tok/fwd",
                "GFLOP/s", "% peak", "speedup vs ref"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for m in result["modes"]:
        t.add_row(m["name"], _f(m["prefill_s"] * 1e3, "{:.1f}"), _f(m["step_s"] * 1e3, "{:.1f}"),
                  _f(m["tokens_per_s_stated"], "{:.1f}"), _f(m["tokens_per_s_measured"], "{:.1f}"),
                  _f(m["tokens_per_forward"], "{:.1f}"), _f(m["step_gflops"], "{:.1f}"),
                  _f(m["fraction_of_peak"] * 100 if m["fraction_of_peak"] is not None else None, "{:.1f}"),
                  _f(m["speedup_vs_reference"], "{:.2f}x"))
    c.print(t)

    p = Table(title="matmul peak (this run)")
    for col in ("dtype", "best GFLOP/s", "best GEMM", "all GEMMs (GFLOP/s)"):
        p.add_column(col)
    for d, pk in result.get("peak", {}).items():
        p.add_row(d, f"{pk['gflops']:.1f}", pk["best_gemm"],
                  "; ".join(f"{g['gemm']}: {g['gflops']:.0f}" for g in pk["gemms"]))
    c.print(p)

    if result["agreement"]:
        a = Table(title="agreement with the reference")
        for col in ("dtype", "check", "result", "ok"):
            a.add_column(col)
        for d, ag in result["agreement"].items():
            if "tokens" in ag:
                tk = ag["tokens"]
                a.add_row(d, "tokens (rng=reference)",
                          f"{tk['matching']}/{tk['compared']} equal, first mismatch {_f(tk['first_mismatch'], '{}')}",
                          "yes" if tk["token_identical"] else "[red]NO[/red]")
            if "logits" in ag:
                lg = ag["logits"]
                tol = ", ".join(f"{k.split('_')[0]} <= {v:g}" for k, v in lg["tolerance"].items())
                a.add_row(d, "one step's logits", f"max |diff| {_f(lg['max_abs_diff'], '{:.3g}')}, mean "
                          f"{_f(lg['mean_abs_diff'], '{:.3g}')} (tol {tol})",
                          "yes" if lg["within_tolerance"] else "[red]NO[/red]")
                sc = lg.get("scale_vs_fp32_reference")
                if sc:
                    a.add_row(d, "scale: vs fp32 reference",
                              f"reference bf16 max {_f(sc['reference_bf16']['max_abs_diff'])} mean "
                              f"{_f(sc['reference_bf16']['mean_abs_diff'])}; dgemma bf16 max "
                              f"{_f(sc['dgemma_bf16']['max_abs_diff'])} mean {_f(sc['dgemma_bf16']['mean_abs_diff'])}"
                              f" (mean |logit| {sc['mean_abs_logit']:.3g})", "")
        c.print(a)

    mem = result.get("memory", {})
    c.print(f"peak RSS {_f(mem.get('peak_rss_mib'), '{:.0f}')} MiB"
            + (f", CUDA max allocated {mem['cuda_max_allocated_mib']:.0f} MiB" if "cuda_max_allocated_mib" in mem
               else ""))
    for m in result["modes"]:
        if m.get("generate_peak_extra_mib") is not None:
            c.print(f"  {m['name']}: generate() peak extra memory {m['generate_peak_extra_mib']:.0f} MiB")
    sm = mem.get("sampler")
    if sm:
        c.print(f"sampler at V={sm['vocab']}, canvas {sm['canvas']}, batch 1 (one fp32 logits tensor = "
                f"{sm['logits_tensor_mib']:.0f} MiB):")
        for name in ("fast_fp32", "fast_bf16", "reference_rng"):
            e = sm[name]
            extra = (f" (+ the self-conditioning buffer it fills, {e['persistent_mib']:.0f} MiB)"
                     if e["persistent_mib"] else "")
            c.print(f"  {name}: peak extra {_f(e['peak_extra_mib'], '{:.0f}')} MiB = "
                    f"{_f(e['multiple_of_logits'], '{:.2f}')}x the logits{extra}, {e['seconds'] * 1e3:.0f} ms")
    for n in result.get("notes", []):
        c.print(f"[yellow]note:[/yellow] {n}")


def summary_markdown(result: dict) -> str:
    """The speed table as Markdown (for benchmarks/NOTES.md)."""
    tpf = result["settings"]["tokens_per_forward_stated"]
    lines = [f"| mode | prefill ms | step ms | tok/s @{tpf:g}/fwd | tok/s @measured | GFLOP/s | % of peak | "
             "speedup vs ref |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["modes"]:
        lines.append(
            f"| {m['name']} | {_f(m['prefill_s'] * 1e3, '{:.1f}')} | {_f(m['step_s'] * 1e3, '{:.1f}')} | "
            f"{_f(m['tokens_per_s_stated'], '{:.1f}')} | {_f(m['tokens_per_s_measured'], '{:.1f}')} | "
            f"{_f(m['step_gflops'], '{:.1f}')} | "
            f"{_f(m['fraction_of_peak'] * 100 if m['fraction_of_peak'] is not None else None, '{:.1f}')} | "
            f"{_f(m['speedup_vs_reference'], '{:.2f}x')} |")
    return "\n".join(lines)

