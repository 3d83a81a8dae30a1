"""dgemma's native extensions: the C++ kernels in `quant/csrc/`, built once with torch's extension builder (cached in
torch's extensions directory) on Linux x86-64 with a C++ compiler. Two modules, each built only where its
instructions run:
- `extension()`: the bf16 kernels, on CPUs with AVX-512 BF16 (lscpu flags avx512f, avx512bw, avx512vl,
  avx512_bf16), with AMX used where the CPU has it and the OS grants the tile state;
- `fp32_extension()`: the fp32 engine for low-bit weights (`csrc/woq_avx2.cpp`), on CPUs with AVX2, FMA and F16C
  (every x86-64 CPU since 2013-2015): what a CPU without native bf16 computes with, since dgemma keeps fp32
  activations there.

A leaf module: each is the built module or None, and every caller keeps a portable torch path for None
(`DGEMMA_NATIVE=0` forces it for both; `DGEMMA_NATIVE=require` makes a machine that cannot build the first an
error). What the kernels are: `quant/native.py` (the low-bit weight kernels, the LM head, the self-conditioning
product, the sampler) and `numerics.py` (norms and activations).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

from .hardware import cpu_flags

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "quant" / "csrc"
SOURCES = tuple(CSRC / f for f in ("woq.cpp", "woq_avx512.cpp", "sample.cpp", "elementwise.cpp", "repack.cpp"))
FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # what the extension needs
FP32_SOURCES = tuple(CSRC / f for f in ("woq_avx2.cpp", "repack.cpp"))
FP32_FLAGS = ("avx2", "fma", "f16c")  # what the fp32 engine needs
AMX_FLAGS = ("amx_tile", "amx_bf16")  # what the AMX engine needs besides


class NativeUnavailable(ValueError):
    """DGEMMA_NATIVE=require, on a machine where the extension cannot run."""


@functools.cache
def extension():
    """The built extension module, or None where it cannot run here (the reason is logged once)."""
    mode = os.environ.get("DGEMMA_NATIVE", "auto")  # "0": off; "require": fail loudly where it cannot run
    if mode == "0":
        return None
    mod = _build()
    if mod is None and mode == "require":
        raise NativeUnavailable("DGEMMA_NATIVE=require, but the native kernel cannot run here (see the log)")
    return mod


def available() -> bool:
    return extension() is not None


@functools.cache
def fp32_extension():
    """The fp32 engine's module (`csrc/woq_avx2.cpp`), or None where it cannot run here."""
    if os.environ.get("DGEMMA_NATIVE", "auto") == "0":
        return None
    # -ffp-contract=off: the kernel's fused multiply-adds are the intrinsics it writes, nothing the compiler adds
    return _compile("dgemma_woq_avx2", FP32_SOURCES, FP32_FLAGS,
                    ["-O3", "-fopenmp", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c"])


def _build():
    # -ffp-contract=off: a product then a sum stays two roundings whatever the compiler (moe_combine and the
    # elementwise kernels repeat torch's roundings)
    mod = _compile("dgemma_woq", SOURCES, FLAGS,
                   ["-O3", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                    "-mf16c", "-mfma", "-mamx-tile", "-mamx-bf16"])
    if mod is not None and all(f in cpu_flags() for f in AMX_FLAGS) and not mod.amx_init():
        log.warning("native kernel: the OS refused the AMX tile state; the AVX-512 BF16 engine runs")
    return mod


def _compile(name: str, sources: tuple[Path, ...], flags: tuple[str, ...], cflags: list[str]):
    """Module `name` built from `sources` where this CPU has every lscpu flag in `flags`, else None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    missing = [f for f in flags if f not in cpu_flags()]
    if missing:
        log.info("native kernel %s off: this CPU lacks %s", name, ", ".join(missing))
        return None
    try:
        from torch.utils import cpp_extension  # the builder (and setuptools) only where the kernel is built

        if not _built_before(cpp_extension, name):
            log.warning("building dgemma's native kernel %s (once; about a minute or two)", name)
        # at::parallel_for runs its work on one thread unless the extension is built with OpenMP; at run time
        # libgomp.so.1 resolves to the copy torch has already loaded, so torch.set_num_threads holds
        return cpp_extension.load(name=name, sources=[str(p) for p in sources], verbose=False, extra_cflags=cflags,
                                  extra_ldflags=["-fopenmp"])
    except Exception as exc:  # a missing compiler or headers: the portable kernels stay
        log.warning("native kernel %s off: building %s failed (%s)", name, sources[0].name,
                    str(exc).splitlines()[0])
        return None


def _built_before(cpp_extension, name: str) -> bool:
    """Whether torch's extension cache already holds a build (a stale one is rebuilt quietly)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").is_file()
    except Exception:  # a private helper of torch's: when it moves, only the notice is lost
        return True
