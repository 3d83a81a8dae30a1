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
NATIVE_BF16_FLAGS = NATIVE_FLAGS[torch.bfloat16]
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
