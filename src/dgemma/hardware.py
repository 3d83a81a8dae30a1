"""What this machine computes fast, and the compute dtype that follows from it.

torch's bf16/fp16 matrix multiply on a CPU without native bf16 instructions (AVX512_BF16 or AMX) runs one to two
orders of magnitude slower than fp32 (it converts element by element), so a 16-bit checkpoint computes in fp32
there: twice the weight memory, but no speed cliff. CUDA and CPUs with native bf16 keep the stored dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# /proc/cpuinfo flags that give the CPU a fast 16-bit matmul path in oneDNN, per dtype.
NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
HALF_DTYPES = tuple(NATIVE_FLAGS)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (Linux /proc/cpuinfo); empty where that file is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_has_native(dtype: torch.dtype) -> bool:
    """True when the CPU flags include dot-product instructions for this 16-bit dtype. Without /proc/cpuinfo (macOS,
    Windows) the answer is False: fp32 compute is never the slow path, a wrong guess for 16 bits can be."""
    return any(f in cpu_flags() for f in NATIVE_FLAGS.get(dtype, ()))


def cpu_has_native_bf16() -> bool:
    return cpu_has_native(torch.bfloat16)


def default_compute_dtype(stored: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to compute a checkpoint stored in `stored` on `device` when the caller did not choose one."""
    device = torch.device(device)
    if stored not in HALF_DTYPES or device.type != "cpu":
        return stored
    return stored if cpu_has_native(stored) else torch.float32


def describe() -> dict[str, object]:
    """CPU model, the flags that matter for matmul speed, threads: for benchmark records."""
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16",
              "amx_int8", "amx_tile")
    return {"cpu": cpu_model(), "flags": [f for f in wanted if f in flags], "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__}


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, fallback: str | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    name = dtype if dtype is not None else (fallback or "float32")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build/machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev
