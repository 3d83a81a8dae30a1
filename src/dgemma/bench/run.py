"""`dgemma bench`: dgemma against the transformers reference on the same random weights, in one run.

For a named preset (`dgemma.presets.PRESETS`), at batch 1 with a fixed number of denoising steps and adaptive
stopping off, each mode (reference and dgemma; fp32: rng="reference" and rng="fast"; bf16: rng="fast") gets:
prefill time, the time of one full denoising step (decoder forward + sampling + acceptance + renoise), tokens/s at a
stated tokens-per-forward, the speed ratio reference / dgemma, and the achieved FLOP/s of a step (counted from the
config, `ModelConfig.decoder_flops`) against this machine's matmul peak measured in the same run (`measure_peak`).
Agreement: fp32 tokens (dgemma rng="reference" vs the reference's generate after torch.manual_seed), and the
max / mean |logit difference| of one denoising step against a stated tolerance.

transformers is the test oracle and is imported lazily here only; without it (or for presets too big to write a
checkpoint for, e.g. 26b-a4b) the reference is skipped with a note and dgemma runs on `presets.random_model`.
Memory measurements (the sampler at the real vocabulary, generate()'s peak) live in `benchmarks/memory.py`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .. import hardware
from ..quant import native
from ..checkpoint.load import load_model
from ..checkpoint.write import write_random_checkpoint
from ..config import ModelConfig
from ..hardware import resolve_dtype
from ..presets import PRESETS, preset_config, random_model
from .measure import Clock, measure_peak, run_timed, timed

REAL_TOKENS_PER_FORWARD = 16.0  # ~accepted tokens per decoder pass the release reports for the 26B-A4B model
# bf16 logits tolerance, the same as tests/test_parity.py: a faithful port agrees bit for bit; allow 4 bf16 ulps at
# the top of the softcapped range (max) and < 1 ulp of a typical logit on average (mean).
BF16_MAX_TOL, BF16_MEAN_TOL = 0.5, 0.02
FP32_MAX_TOL = 1e-5
# The reference is run from a checkpoint written to a temporary directory: skip it above this fp32 size.
REFERENCE_MAX_CHECKPOINT_BYTES = 8 << 30
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class BenchOptions:
    """What `dgemma bench` runs; the CLI flags of the same names."""

    preset: str = "small-moe"
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    steps: int = 8  # denoising steps per canvas, fixed; the step time is timed over steps 2..N
    prompt_len: int = 64
    seed: int = 0
    device: str = "cpu"
    reference: bool = True
    threads: int | None = None  # torch CPU threads during the run (None: leave torch's setting)
    repeats: int = 3  # timed runs per mode at least; the best counts
    min_time_s: float = 1.0  # keep repeating a mode until this much time is spent on it (up to 100 runs)
    tokens_per_forward: float = REAL_TOKENS_PER_FORWARD  # for the stated tokens/s
    peak_budget_s: float = 0.25  # time per GEMM shape of the matmul peak
    std: float = 0.02  # random weight init

    def __post_init__(self) -> None:
        if isinstance(self.dtypes, str):
            self.dtypes = tuple(d for d in self.dtypes.replace(" ", "").split(",") if d)
        self.dtypes = tuple(self.dtypes)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError("steps must be an integer >= 2 (the step time is timed over steps 2..N)")
        if self.prompt_len < 1:
            raise ValueError("prompt_len must be >= 1")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available in this torch build")
        self.torch_dtypes()

    def torch_dtypes(self) -> list[torch.dtype]:
        out = []
        for d in self.dtypes:
            t = resolve_dtype(d)
            if t == torch.float16:
                raise ValueError("bench measures float32 and bfloat16")
            if t not in out:
                out.append(t)
        if not out:
            raise ValueError("no dtypes to benchmark")
        return out


def run_bench(opts: BenchOptions) -> dict:
    """Run the benchmark and return a JSON-serialisable dict (see `render`). Batch 1, one canvas
    (max_new_tokens = canvas_length), `opts.steps` denoising steps, adaptive stopping off."""
    opts.validate()
    saved_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _run_bench(opts)
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Measured:
    """What the per-dtype runs collect."""

    modes: list[dict] = field(default_factory=list)
    agreement: dict[str, dict] = field(default_factory=dict)
    probe_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (dgemma, reference)


def _run_bench(opts: BenchOptions) -> dict:
    cfg = preset_config(opts.preset)
    device = torch.device(opts.device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = _header(opts, cfg, device)
    notes: list[str] = []
    ref_cls = _reference_class(opts, cfg, notes)
    result["reference"] = {"ran": ref_cls is not None,
                           "class": "transformers DiffusionGemmaForBlockDiffusion" if ref_cls else None}
    prompt, probe_canvas = _inputs(opts, cfg, device)
    measured = _Measured()
    with _shared_checkpoint(opts, ref_cls is not None) as ckpt:
        result["weights"] = ("random fp32 checkpoint (write_random_checkpoint), loaded by both sides" if ckpt
                             else "random, built in memory (presets.random_model)")
        for dtype in opts.torch_dtypes():
            _bench_dtype(opts, dtype, device, ckpt, ref_cls, prompt, probe_canvas, measured, notes)
    if not measured.modes:
        raise MemoryError("; ".join(notes))
    _bf16_scale(measured)
    result["peak"] = {DTYPE_NAMES[d]: measure_peak(cfg, d, device, opts.peak_budget_s) for d in opts.torch_dtypes()}
    _derive(measured.modes, result, opts, notes)
    result["modes"], result["agreement"] = measured.modes, measured.agreement
    result["memory"] = _memory(device)
    _load_note(result, load_start, notes)
    result["notes"] = notes
    return result


def _header(opts: BenchOptions, cfg: ModelConfig, device: torch.device) -> dict:
    canvas = cfg.canvas_length
    dec = cfg.decoder_flops(opts.prompt_len, canvas, self_conditioning=True)
    return {
        "preset": opts.preset,
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_experts": cfg.num_experts,
            "top_k_experts": cfg.top_k_experts, "moe_intermediate_size": cfg.moe_intermediate_size,
            "intermediate_size": cfg.intermediate_size, "sliding_window": cfg.sliding_window,
            "canvas_length": canvas, "parameters": cfg.num_params, "active_parameters": cfg.active_params,
        },
        "settings": {"dtypes": [DTYPE_NAMES[d] for d in opts.torch_dtypes()], "steps": opts.steps,
                     "prompt_len": opts.prompt_len, "seed": opts.seed, "batch": 1, "max_new_tokens": canvas,
                     "device": str(device), "threads": torch.get_num_threads(), "repeats": opts.repeats,
                     "min_time_s": opts.min_time_s, "adaptive_stopping": False,
                     "tokens_per_forward_stated": opts.tokens_per_forward, "weight_std": opts.std},
        "machine": machine_info(device),
        "flops": {"denoise_step": dec["total"],
                  "denoise_step_first": cfg.decoder_flops(opts.prompt_len, canvas, self_conditioning=False)["total"],
                  "denoise_step_breakdown": dec, "prefill": cfg.prefill_flops(opts.prompt_len)},
    }


def _reference_class(opts: BenchOptions, cfg: ModelConfig, notes: list[str]):
    """The reference model class, or None (with a note saying why) when it does not run."""
    if not opts.reference:
        notes.append("reference not requested (--no-reference)")
        return None
    try:
        from transformers import DiffusionGemmaForBlockDiffusion
    except ImportError as e:  # also: transformers too old to have the model
        notes.append(f"transformers is not installed or lacks DiffusionGemma ({e}); reference skipped")
        return None
    ckpt_bytes = cfg.num_params * 4
    if ckpt_bytes > REFERENCE_MAX_CHECKPOINT_BYTES:
        notes.append(f"preset {opts.preset} is too big for the reference (a {ckpt_bytes / 1e9:.0f} GB fp32 "
                     f"checkpoint); reference skipped, dgemma runs on random weights built in memory")
        return None
    return DiffusionGemmaForBlockDiffusion


def _inputs(opts: BenchOptions, cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random prompt and a random canvas for the one-step logits comparison."""
    gen = torch.Generator().manual_seed(opts.seed)
    hi = min(cfg.vocab_size, 255999)  # below the image / special ids of the real vocabulary
    prompt = torch.randint(3, hi, (1, opts.prompt_len), generator=gen).to(device)
    probe_canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=gen).to(device)
    return prompt, probe_canvas


@contextlib.contextmanager
def _shared_checkpoint(opts: BenchOptions, needed: bool) -> Iterator[Path | None]:
    """A random fp32 checkpoint in a temporary directory that both sides load, when the reference runs."""
    if not needed:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
    try:
        yield write_random_checkpoint(tmp / opts.preset, opts.preset, seed=opts.seed, dtype="float32", std=opts.std)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_dtype(opts: BenchOptions, dtype: torch.dtype, device: torch.device, ckpt: Path | None, ref_cls,
                 prompt: torch.Tensor, probe_canvas: torch.Tensor, measured: _Measured, notes: list[str]) -> None:
    """Time the reference (if any) and dgemma's modes in one dtype; compare tokens and one step's logits."""
    dname = DTYPE_NAMES[dtype]
    try:
        model = (load_model(ckpt, dtype=dtype, device=device) if ckpt is not None
                 else random_model(opts.preset, dtype, device, seed=opts.seed, std=opts.std))
    except MemoryError as e:  # e.g. 26b-a4b in fp32: skip this dtype, keep the others
        notes.append(f"{dname} skipped: {e}")
        return
    ref = _load_reference(ref_cls, ckpt, dtype, device) if ref_cls is not None else None
    canvas = model.config.canvas_length
    ref_ids = None
    if ref is not None:
        t = _time_mode(lambda n, ck, ref=ref: _run_reference(ref, prompt, canvas, n, opts.seed, ck), opts, device)
        out = t.pop("output")
        ref_ids = _ref_ids(out, prompt.shape[1], model.generation_config.pad_token_id)
        measured.modes.append({"impl": "reference", "dtype": dname, "rng": "torch.manual_seed", **t,
                               "tokens": len(ref_ids),
                               "tokens_per_forward": float(out.tokens_per_forward.reshape(-1)[0])})
    for rng in ["reference", "fast"] if dtype == torch.float32 else ["fast"]:
        t = _time_mode(lambda n, ck, rng=rng, model=model: run_timed(model, prompt, canvas, n, opts.seed, rng, ck),
                       opts, device)
        res = t.pop("output")
        tim = res.timings
        measured.modes.append({"impl": "dgemma", "dtype": dname, "rng": rng, **t, "tokens": len(res.ids),
                               "tokens_per_forward": res.tokens_per_forward,
                               "internal": {"prefill_s": tim["prefill_s"], "denoise_s": tim["denoise_s"],
                                            "total_s": tim["total_s"], "step_s": tim["denoise_s"] / opts.steps}})
        if rng == "reference" and ref_ids is not None:
            measured.agreement.setdefault(dname, {})["tokens"] = _token_agreement(res.ids, ref_ids)
    if ref is not None:
        measured.agreement.setdefault(dname, {})["logits"], measured.probe_logits[dname] = _compare_logits(
            model, ref, prompt, probe_canvas, dtype)
    del model, ref
    gc.collect()


def _bf16_scale(measured: _Measured) -> None:
    """How far bf16 itself moves the logits: both bf16 runs against the fp32 reference (no self-conditioning)."""
    logits = measured.probe_logits
    if "float32" in logits and "bfloat16" in logits:
        fp32_ref = logits["float32"][1]
        dg16, ref16 = logits["bfloat16"]
        measured.agreement["bfloat16"]["logits"]["scale_vs_fp32_reference"] = {
            "reference_bf16": _logit_diff(ref16, fp32_ref), "dgemma_bf16": _logit_diff(dg16, fp32_ref),
            "mean_abs_logit": float(fp32_ref.abs().mean()),
        }
    logits.clear()


def _derive(modes: list[dict], result: dict, opts: BenchOptions, notes: list[str]) -> None:
    """Per mode: name, tokens/s, GFLOP/s, fraction of the matmul peak, speed-up against the reference."""
    step_flops, prefill_flops = result["flops"]["denoise_step"], result["flops"]["prefill"]
    for m in modes:
        peak = result["peak"][m["dtype"]]["gflops"]
        step = m["step_s"]
        m["name"] = f"{m['impl']} {m['dtype']}" + (f" rng={m['rng']}" if m["impl"] == "dgemma" else "")
        m["valid"] = step > 0
        m["tokens_per_s_stated"] = opts.tokens_per_forward / step if step > 0 else None
        m["tokens_per_s_measured"] = m["tokens_per_forward"] / step if step > 0 else None
        m["tokens_per_s_end_to_end"] = m["tokens"] / m["wall_s"] if m["wall_s"] > 0 else None
        m["step_gflops"] = step_flops / step / 1e9 if step > 0 else None
        m["fraction_of_peak"] = m["step_gflops"] / peak if m["step_gflops"] is not None else None
        m["prefill_gflops"] = prefill_flops / m["prefill_s"] / 1e9 if m["prefill_s"] > 0 else None
        if step <= 0:
            notes.append(f"{m['name']}: non-positive step time (timer trouble?)")
    for m in modes:
        base = next((r for r in modes if r["impl"] == "reference" and r["dtype"] == m["dtype"]), None)
        ok = base is not None and m["impl"] == "dgemma" and m["valid"] and base["valid"]
        m["speedup_vs_reference"] = base["step_s"] / m["step_s"] if ok else None
        m["prefill_speedup_vs_reference"] = (base["prefill_s"] / m["prefill_s"]
                                             if ok and m["prefill_s"] > 0 and base["prefill_s"] > 0 else None)


def _memory(device: torch.device) -> dict:
    # ru_maxrss is in KiB on Linux.
    memory: dict[str, Any] = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def _load_note(result: dict, load_start, notes: list[str]) -> None:
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    mach = result["machine"]
    mach["loadavg_start"] = list(load_start) if load_start else None
    mach["loadavg_end"] = list(load_end) if load_end else None
    if load_start and max(load_start[0], load_end[0]) > 1.2 * mach["usable_cpus"]:
        notes.append(f"the machine was busy (1-min load average {load_start[0]:.1f} -> {load_end[0]:.1f} on "
                     f"{mach['usable_cpus']} CPUs): absolute times are inflated and noisy; "
                     "ratios within this run are more meaningful")


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------
def _git_state() -> dict | None:
    """The commit (and whether the tree is dirty) of the source checkout this dgemma runs from, if it is one."""
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
    hw = hardware.describe()  # CPU model, the matmul-relevant flags, native bf16 or not
    try:
        import transformers

        tver = transformers.__version__
    except ImportError:
        tver = None
    info = {
        "cpu": hw["cpu"], "cpu_flags": hw["flags"], "native_bf16": hw["native_bf16"], "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": tver,
        "native_kernel": native.available(),  # dgemma's kernel for low-bit weights runs here
        "native_engine": native.engine(),  # for bf16 activations: "amx" or "avx512-bf16"
        "fp32_engine": native.FP32_ENGINE if native.fp32_available() else None,  # for fp32 activations
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "dgemma_source": _git_state(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Timing one mode
# ---------------------------------------------------------------------------------------------------------------
class _DraftStreamer:
    """A draft-capable streamer for the reference's generate: put_draft is called after every denoising step."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def put(self, value) -> None:
        pass

    def put_draft(self, value=None, logits=None) -> None:
        self.clock.steps.append(self.clock.now())

    def end(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the reference's load report and progress bars while loading."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
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


def _run_reference(ref, prompt, canvas: int, steps: int, seed: int, clock: Clock):
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


def _time_mode(run: Callable[[int, Clock], Any], opts: BenchOptions, device: torch.device) -> dict:
    """Time `run(steps, clock)` (one generate call) after a warm-up: at least `opts.repeats` runs, more while less
    than `opts.min_time_s` has been spent (up to 100). Per run: wall time, prefill (the encoder pass), and the
    steady-state step = (end of step N - end of step 1) / (N - 1) (steps 2..N, each a full step with
    self-conditioning). Interference from other processes only adds time, so the best run counts. Returns the
    numbers and the output of the last run."""
    run(2, Clock(device))  # warm-up (allocator, kernels, thread pools)
    runs, out, spent = [], None, 0.0
    while len(runs) < opts.repeats or (spent < opts.min_time_s and len(runs) < 100):
        clock = Clock(device)
        wall, out = timed(lambda: run(opts.steps, clock), device)
        if len(clock.steps) != opts.steps:
            raise RuntimeError(f"expected {opts.steps} denoising steps, saw {len(clock.steps)} "
                               "(adaptive stopping on?)")
        runs.append({"wall_s": wall, **clock.record()})
        spent += wall
    best = {k: min(r[k] for r in runs) for k in ("wall_s", "prefill_s", "first_step_s", "step_s")}
    return {**best, "step_s_median": statistics.median(r["step_s"] for r in runs),
            "prefill_s_median": statistics.median(r["prefill_s"] for r in runs), "runs": len(runs),
            "step_s_all": [r["step_s"] for r in runs], "prefill_s_all": [r["prefill_s"] for r in runs],
            "output": out}


# ---------------------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------------------
def _ref_ids(out, prompt_len: int, pad: int | None) -> list[int]:
    row = out.sequences[0, prompt_len:]
    if pad is not None:
        row = row[row != pad]
    return row.tolist()


def _token_agreement(ids: list[int], ref_ids: list[int]) -> dict:
    n = min(len(ids), len(ref_ids))
    first = next((j for j in range(n) if ids[j] != ref_ids[j]), None)
    if first is None and len(ids) != len(ref_ids):
        first = n
    same = sum(a == b for a, b in zip(ids, ref_ids))
    return {"token_identical": ids == ref_ids, "compared": max(len(ids), len(ref_ids)), "matching": same,
            "matching_fraction": same / max(1, len(ids), len(ref_ids)), "first_mismatch": first,
            "note": "dgemma rng='reference' vs reference generate after torch.manual_seed(seed)"}


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
    finite = plain["finite"] and with_sc["finite"]
    ok = finite and all(d[k] <= v for d in (plain, with_sc) for k, v in tol.items())
    return {
        "max_abs_diff": max(plain["max_abs_diff"], with_sc["max_abs_diff"]) if finite else None,
        "mean_abs_diff": max(plain["mean_abs_diff"], with_sc["mean_abs_diff"]) if finite else None,
        "finite": finite, "tolerance": tol, "within_tolerance": ok,
        "no_self_conditioning": plain, "self_conditioning": with_sc,
    }, (got.float().cpu(), want.float().cpu())


# ---------------------------------------------------------------------------------------------------------------
# Output: one row model, two renderings (rich in the terminal, Markdown for notes)
# ---------------------------------------------------------------------------------------------------------------
def _f(x, fmt: str = "{:.3g}", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _pct(x: float | None) -> float | None:
    return x * 100 if x is not None else None


def speed_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """The speed table: column headers and one row of formatted cells per mode."""
    tpf = result["settings"]["tokens_per_forward_stated"]
    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("mode", lambda m: m["name"]),
        ("prefill ms", lambda m: _f(m["prefill_s"] * 1e3, "{:.1f}")),
        ("step ms", lambda m: _f(m["step_s"] * 1e3, "{:.1f}")),
        (f"tok/s @{tpf:g}/fwd", lambda m: _f(m["tokens_per_s_stated"], "{:.1f}")),
        ("tok/s @measured", lambda m: _f(m["tokens_per_s_measured"], "{:.1f}")),
        ("tok/fwd", lambda m: _f(m["tokens_per_forward"], "{:.1f}")),
        ("GFLOP/s", lambda m: _f(m["step_gflops"], "{:.1f}")),
        ("% of peak", lambda m: _f(_pct(m["fraction_of_peak"]), "{:.1f}")),
        ("speedup vs ref", lambda m: _f(m["speedup_vs_reference"], "{:.2f}x")),
    ]
    return [h for h, _ in columns], [[cell(m) for _, cell in columns] for m in result["modes"]]


def render(result: dict, console=None) -> None:
    """Print the benchmark result as rich tables."""
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

    headers, rows = speed_table(result)
    t = Table(title="denoising speed: step = (end of step N - end of step 1) / (N - 1), prefill = encoder pass; "
                    "best run")
    for h in headers:
        t.add_column(h, justify="left" if h == "mode" else "right")
    for r in rows:
        t.add_row(*r)
    c.print(t)

    p = Table(title="matmul peak (this run)")
    for col in ("dtype", "best GFLOP/s", "best GEMM", "all GEMMs (GFLOP/s)"):
        p.add_column(col)
    for d, pk in result["peak"].items():
        p.add_row(d, f"{pk['gflops']:.1f}", pk["best_gemm"],
                  "; ".join(f"{g['gemm']}: {g['gflops']:.0f}" for g in pk["gemms"]))
    c.print(p)

    if result["agreement"]:
        a = Table(title="agreement with the reference")
        for col in ("dtype", "check", "result", "ok"):
            a.add_column(col)
        for d, ag in result["agreement"].items():
            for row in _agreement_rows(ag):
                a.add_row(d, *row)
        c.print(a)

    mem = result["memory"]
    c.print(f"peak RSS {_f(mem.get('peak_rss_mib'), '{:.0f}')} MiB"
            + (f", CUDA max allocated {mem['cuda_max_allocated_mib']:.0f} MiB" if "cuda_max_allocated_mib" in mem
               else ""))
    for n in result["notes"]:
        c.print(f"[yellow]note:[/yellow] {n}")


def _agreement_rows(ag: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "tokens" in ag:
        tk = ag["tokens"]
        rows.append(("tokens (rng=reference)",
                     f"{tk['matching']}/{tk['compared']} equal, first mismatch {_f(tk['first_mismatch'], '{}')}",
                     "yes" if tk["token_identical"] else "[red]NO[/red]"))
    if "logits" in ag:
        lg = ag["logits"]
        tol = ", ".join(f"{k.split('_')[0]} <= {v:g}" for k, v in lg["tolerance"].items())
        rows.append(("one step's logits", f"max |diff| {_f(lg['max_abs_diff'])}, mean {_f(lg['mean_abs_diff'])} "
                     f"(tol {tol})", "yes" if lg["within_tolerance"] else "[red]NO[/red]"))
        sc = lg.get("scale_vs_fp32_reference")
        if sc:
            r16, d16 = sc["reference_bf16"], sc["dgemma_bf16"]
            rows.append(("scale: vs fp32 reference",
                         f"reference bf16 max {_f(r16['max_abs_diff'])} mean {_f(r16['mean_abs_diff'])}; dgemma "
                         f"bf16 max {_f(d16['max_abs_diff'])} mean {_f(d16['mean_abs_diff'])} "
                         f"(mean |logit| {sc['mean_abs_logit']:.3g})", ""))
    return rows
