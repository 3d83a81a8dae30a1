"""dgemma's native kernel for low-bit weights (int4, NVFP4, FP8) on x86 CPUs with bf16 dot products, and the tile
layout it reads.

On a CPU with AVX-512 BF16 (lscpu flags avx512f, avx512bw, avx512vl, avx512_bf16: AMD Zen 4 and later, Intel Cooper
Lake and Sapphire Rapids and later) and a C++ compiler, where `dgemma.extension` builds the native extension
(`csrc/woq.cpp` with `csrc/woq_avx512.cpp`; `csrc/sample.cpp` and `csrc/elementwise.cpp` are in it too), a
quantized linear layer or a layer's experts are repacked at load into `TileTensor`s: the same codes and scales,
ordered so that the kernel expands 32 output columns at a time into bf16 in cache and multiplies them there. Nothing
expanded reaches memory, and the experts of a layer run in one call spread over torch's threads (no Python loop over
experts). Two engines multiply the expanded tiles: AMX where the CPU has it (amx_tile, amx_bf16) and the OS grants
the tile state, else AVX-512 BF16 (vdpbf16ps, accumulators in registers); `engine()` says which, `use_engine`
switches (tests and benchmarks run both where both exist).

What the products are: the expansion is the bf16 rounding of the format's own dequantized weight ((q - 8) * scale
for int4, e4m3 * scale for FP8, each exact in fp32 and rounded once; e2m1 * block scale for NVFP4, exact in bf16,
with its global scale on the output), accumulated in fp32 in another order than oneDNN's GEMM (and each engine in
its own): outputs agree with the dequantized model's bf16 matmul to fp32 rounding. Matrices (or experts) given at
most `SMALL_ROWS` rows (left-to-right decoding) skip the expansion (int4, NVFP4): AVX-512 fp32 products of the codes'
values with the activations, scaled once per block, i.e. the exact fp32 dequantized weight. int4 weights given up
to `EXACT_ROWS` rows (a denoising step gives each of 128 experts about 16) take the group-scaled path: tiles of
q - 8 alone (exact in bf16, one lookup per tile row), each scale group's fp32 sums times the scales, again the exact
dequantized weight and cheaper there than the scaled expansion, which stays for more rows, where one expansion
serves many (tests/test_native_kernel.py states the tolerances). Inside `numerics.row_invariant()` (the default
sampler) the path depends on the weight, never on the row count, so a row's result never depends on its
neighbours: int4 experts are always group-scaled (a canvas gives them few rows each), everything else takes the
scaled expansion.

fp32 activations (what dgemma computes in on a CPU without native bf16, or when asked for fp32) take the fp32 engine
(`csrc/woq_avx2.cpp`, any CPU with AVX2, FMA and F16C): the same tiles expanded into the format's exact fp32
dequantized weight, one fused multiply-add per input in ascending order for each row, so a row's result never
depends on its neighbours (row_invariant() or not), and agrees with the dequantized model's fp32 matmul to fp32
rounding.

Anywhere else (no AVX2 and no AVX-512 BF16, no compiler, `DGEMMA_NATIVE=0`, other devices, shapes the tiles do not
cover) nothing changes: `adopt` returns the QTensor it was given and the portable kernels in `kernels.py` run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from ..extension import available, extension, fp32_extension
from ..numerics import ROW_INVARIANT
from . import kernels as K
from .qtensor import MODE, QTensor, QuantError

ENGINES = ("amx", "avx512-bf16")
FP32_ENGINE = "avx2-fp32"  # the engine for fp32 activations
FORMATS = {"int4": 0, "nvfp4": 1, "fp8": 2, "bf16": 3}  # bf16: a plain [N, K] matrix read in place (head_product)
TILE_N, TILE_K = 16, 32
NVFP4_BLOCK = 16
SMALL_ROWS = 4  # experts (or matrices) with this many rows or fewer: the kernel's dot-product path (int4, NVFP4)
EXACT_ROWS = 32  # int4 weights given more rows, up to this many: the group-scaled path (unrounded weights)
ALL_ROWS = 2 ** 62


def engines() -> tuple[str, ...]:
    """The engines that can run here, the default first: ("amx", "avx512-bf16"), ("avx512-bf16",) or ()."""
    mod = extension()
    if mod is None:
        return ()
    return ENGINES if mod.amx_granted() else ENGINES[1:]  # the default (first): the fastest


def engine() -> str | None:
    """The engine the kernel calls use now (None where the kernel does not run)."""
    mod = extension()
    return None if mod is None else ENGINES[0] if mod.amx_active() else ENGINES[1]


def fp32_available() -> bool:
    """Whether the fp32 engine runs here."""
    return fp32_extension() is not None


def tiles_available() -> bool:
    """Whether some engine here multiplies weights in the tile layout (so that loading repacks into it)."""
    return available() or fp32_available()


def describe() -> str:
    """The engines that run here, per activation dtype: e.g. "bf16: amx, fp32: avx2-fp32", or "off"."""
    parts = ([f"bf16: {engine()}"] if available() else []) + ([f"fp32: {FP32_ENGINE}"] if fp32_available() else [])
    return ", ".join(parts) or "off"


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Run the kernel calls inside on engine `name` (one of `engines()`); the engine before comes back after."""
    if name not in engines():
        raise QuantError(f"native engine {name!r} cannot run here (available: {', '.join(engines()) or 'none'})")
    mod, before = extension(), engine()
    mod.use_amx(name == "amx")
    try:
        yield
    finally:
        mod.use_amx(before == "amx")


# -- the tile layout (pure torch: also what the tests check on machines without the kernel) -------------------------
def _tile_order(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., N, K] -> [..., N/16, K/32, 16 rows, 32 elements]: element e of row r is W[16 nb + e/2, 32 kb + 2r
    + e%2] (AMX's VNNI order of a B tile)."""
    *lead, n, k = codes.shape
    t = codes.reshape(*lead, n // TILE_N, TILE_N, k // TILE_K, TILE_K // 2, 2)  # [.., nb, col, kb, r, j]
    nd = len(lead)
    t = t.permute(*range(nd), nd, nd + 2, nd + 3, nd + 1, nd + 4)  # [.., nb, kb, r, col, j]
    return t.reshape(*lead, n // TILE_N, k // TILE_K, TILE_K // 2, TILE_K)


def _untile(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `_tile_order`: [..., N/16, K/32, 16, 32] -> [..., N, K]."""
    *lead, _, _, _, _ = tiles.shape
    nd = len(lead)
    t = tiles.reshape(*lead, n // TILE_N, k // TILE_K, TILE_K // 2, TILE_N, 2)  # [.., nb, kb, r, col, j]
    t = t.permute(*range(nd), nd, nd + 3, nd + 1, nd + 2, nd + 4)  # [.., nb, col, kb, r, j]
    return t.reshape(*lead, n, k)


def tile_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes uint8 [..., N, K] -> the kernel's bytes [..., N/16, K/32, 4, 64]: each tile's 16 VNNI rows in four
    groups of 64 bytes, 16-bit word e of group g holding element e of rows 4g .. 4g + 3 in its nibbles 0-3 (byte 2e:
    rows 4g and 4g + 1, byte 2e + 1: rows 4g + 2 and 4g + 3), the order one shift and one permute expand
    (csrc/tiles.h, GROUP_BYTES)."""
    t = _tile_order(codes.to(torch.uint8))
    r = t.reshape(*t.shape[:-2], 4, 4, TILE_K)  # [..., group, row in group, element]
    lo, hi = r[..., 0, :] | (r[..., 1, :] << 4), r[..., 2, :] | (r[..., 3, :] << 4)
    return torch.stack([lo, hi], dim=-1).reshape(*t.shape[:-2], 4, 2 * TILE_K)


def untile_nibbles(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = tiles.reshape(*tiles.shape[:-1], TILE_K, 2)
    lo, hi = b[..., 0], b[..., 1]
    rows = torch.stack([lo & 0xF, lo >> 4, hi & 0xF, hi >> 4], dim=-2)  # [..., group, row in group, element]
    return _untile(rows.reshape(*tiles.shape[:-2], 16, TILE_K), n, k)


def tile_scales(scales: torch.Tensor) -> torch.Tensor:
    """Per-column scales [..., N, blocks] -> [..., N/16, blocks, 16] (16 columns' values together)."""
    *lead, n, b = scales.shape
    return scales.reshape(*lead, n // TILE_N, TILE_N, b).transpose(-1, -2).contiguous()


def untile_scales(tiles: torch.Tensor) -> torch.Tensor:
    *lead, nb, b, _ = tiles.shape
    return tiles.transpose(-1, -2).reshape(*lead, nb * TILE_N, b)


# -- the QTensor --------------------------------------------------------------------------------------------------
@dataclass(repr=False)
class TileTensor(QTensor):
    """A low-bit weight in the native kernel's tile layout. `fmt` is "int4" (codes 0..15, W = (q - 8) * scale, bf16
    scales per `block` inputs), "nvfp4" (e2m1 codes, e4m3 scales per 16 inputs, fp32 `out_scale` per output column:
    W = e2m1 * scale * out_scale, or / out_scale with `out_divides`) or "fp8" (e4m3 codes, fp32 scales per `block`
    inputs). `scheme` stays the format it was read as ("int4", "nvfp4", "fp8-channel", "fp8-block"): the tile order
    is how it is held, not what it is."""

    codes: torch.Tensor
    scale: torch.Tensor
    out_scale: torch.Tensor | None = None
    out_divides: bool = False
    fmt: str = "int4"
    block: int = 64
    scheme: str = "int4"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        n, k = self.shape[-2:]
        codes = self.codes if index is None else self.codes[index]
        scale = untile_scales(self.scale if index is None else self.scale[index])
        if self.fmt == "fp8":
            q = _untile(codes, n, k).view(torch.float8_e4m3fn).float()
        else:
            q = untile_nibbles(codes, n, k)
            q = K.e2m1_table().to(q.device)[q.long()] if self.fmt == "nvfp4" else q.float().sub_(K.INT4_ZERO)
        s = scale.float() if self.fmt != "nvfp4" else scale.view(torch.float8_e4m3fn).float()
        w = (q.view(*q.shape[:-1], k // self.block, self.block) * s.unsqueeze(-1)).view(q.shape)
        if self.out_scale is not None:
            gs = (self.out_scale if index is None else self.out_scale[index]).unsqueeze(-1)
            w = w / gs if self.out_divides else w * gs
        return w.to(dtype)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if self.is_fused and index is None:
            raise ValueError(f"amx QTensor of shape {list(self.shape)} holds experts: pass index=")
        if not self.runs(x):
            return super().linear(x, index)
        flat = x.reshape(-1, x.shape[-1])
        offsets = torch.tensor([0, flat.shape[0]], dtype=torch.int64)
        y = self.grouped(flat, offsets, only=index, bf16=x.dtype == torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def runs(self, x: torch.Tensor) -> bool:
        """Whether a kernel takes x: bf16 activations on the CPU where the bf16 engines run, fp32 ones where the fp32
        engine does (fp16 ones keep their precision through the dequantized matmul), unless the exact dequantize
        path is asked for (`MODE`) or x needs a gradient (the kernels have no backward; the dequantized matmul
        does)."""
        if x.device.type != "cpu" or MODE["kernel"] != "auto" or (torch.is_grad_enabled() and x.requires_grad):
            return False
        return available() if x.dtype == torch.bfloat16 else x.dtype == torch.float32 and fp32_available()

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, only: int | None = None,
                bf16: bool = False) -> torch.Tensor:
        """fp32 [rows, N]: rows offsets[e]:offsets[e+1] of x times expert e (or all rows times expert `only`). x may
        hold up to 16 rows more than offsets[-1] (`padded_rows`), which the A tiles read and nothing else uses.
        `bf16`: the result rounded to bf16 (what .to(torch.bfloat16) of the fp32 result gives), written so by the
        kernel where no output scale follows: no fp32 [rows, N] in memory. fp32 x takes the fp32 engine (any row
        count; `bf16` must be False)."""
        n, k = self.shape[-2:]
        codes, scale, gs = self.codes, self.scale, self.out_scale
        if only is not None:
            codes, scale, gs = codes[only], scale[only], (None if gs is None else gs[only])
        if x.dtype == torch.float32:
            if bf16:
                raise QuantError("fp32 activations give fp32 outputs: call with bf16=False")
            if not fp32_available():
                raise QuantError("the fp32 engine is not available on this machine")
            y = fp32_extension().woq_grouped_f32(x.contiguous(), offsets, codes, scale, FORMATS[self.fmt], n, k,
                                                 self.block)
            return y if gs is None else self._global_scale(y, gs, offsets)
        mod = extension()
        if mod is None:
            raise QuantError("the native kernel is not available on this machine")
        a, rows = x, int(offsets[-1])
        # a buffer from `padded_rows` (16 spare rows) always covers the tiles: no need to work out what they read
        if (x.dtype != torch.bfloat16 or not x.is_contiguous()
                or (x.shape[0] < rows + TILE_N and x.shape[0] < tile_rows(offsets))):
            a = padded_rows(rows, k)
            a[:rows].copy_(x[:rows])
        if ROW_INVARIANT.get():  # one path per weight, whatever the row count: experts group-scaled (int4)
            small, exact = 0, (ALL_ROWS if self.is_fused else 0)
        else:
            small, exact = SMALL_ROWS, EXACT_ROWS
        y = mod.woq_grouped(a, offsets, codes, scale, FORMATS[self.fmt], n, k, self.block, small, exact,
                            bf16 and gs is None)
        if gs is not None:
            y = self._global_scale(y, gs, offsets)
        return y.to(torch.bfloat16) if bf16 else y

    def _global_scale(self, y: torch.Tensor, gs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """NVFP4's global scale on the fp32 outputs (per expert: each row takes its expert's column scales)."""
        if gs.dim() == 2:
            gs = gs.repeat_interleave(offsets.diff(), dim=0)
        return y / gs if self.out_divides else y * gs

    def to(self, device: str | torch.device) -> "TileTensor":
        if torch.device(device).type != "cpu":
            raise QuantError("a tile-layout weight lives on the CPU; load the checkpoint on the target device")
        return self



def padded_rows(rows: int, k: int) -> torch.Tensor:
    """A bf16 [rows + 16, k] buffer whose last 16 rows are zero: room for every A tile the kernel loads, whatever the
    grouping; callers write the first `rows`."""
    a = torch.empty(rows + TILE_N, k, dtype=torch.bfloat16)
    a[rows:].zero_()
    return a


def tile_rows(offsets: torch.Tensor) -> int:
    """The rows of x the kernel's A tiles read: each group's rows from its start, rounded up to 16 (the extension
    checks the same)."""
    counts = offsets.diff()
    ends = offsets[:-1] + (counts + TILE_N - 1) // TILE_N * TILE_N
    return int(ends[counts > 0].max()) if bool((counts > 0).any()) else 0


def table_product(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """probs [..., V] @ table [V, H] in bf16 (the self-conditioning input) by the native kernel, which reads the
    table in place where oneDNN would reorder all of it at every call: the bf16 rounding of fp32 sums of the exact
    products, in an order that does not depend on the row count (not oneDNN's order, so not its bits: the model calls
    it inside `row_invariant()` only). None where the kernel does not run here or does not cover the shapes (the
    caller's matmul stays). fp32 probs with a bf16 table take the fp32 engine: an fp32 result, each row's sum in
    ascending vocabulary order."""
    v, h = table.shape
    if torch.is_grad_enabled() and (probs.requires_grad or table.requires_grad):
        return None  # no backward here: training keeps torch's matmul
    if probs.dtype == torch.float32:
        return dense_f32(probs, table, trans=False)
    if (probs.dtype != torch.bfloat16 or table.dtype != torch.bfloat16 or probs.device.type != "cpu"
            or table.device.type != "cpu" or v % 256 or h % 64 or not available()):
        return None
    flat = probs.reshape(-1, v)
    rows = flat.shape[0]
    if rows % TILE_N or not flat.is_contiguous():
        padded = torch.zeros((rows + TILE_N - 1) // TILE_N * TILE_N, v, dtype=torch.bfloat16)
        padded[:rows] = flat
        flat = padded
    out = extension().table_product(flat, table.contiguous())[:rows]
    return out.to(torch.bfloat16).reshape(*probs.shape[:-1], h)


def head_product(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor | None:
    """hidden [..., H] @ table [V, H].T in bf16 (the tied LM head) by the native kernel: the table is read in place,
    each strip of 32 vocabulary rows transposed into tiles once per call and used by every row; the bf16 rounding of
    fp32 sums of the exact products, in an order that does not depend on the row count (not oneDNN's order, so not
    its bits: the model calls it inside `row_invariant()` only). None where the kernel does not run here or does not
    cover the shapes. fp32 hidden states with a bf16 table take the fp32 engine (an fp32 result)."""
    v, h = table.shape
    if torch.is_grad_enabled() and (hidden.requires_grad or table.requires_grad):
        return None
    if hidden.dtype == torch.float32:
        return dense_f32(hidden, table, trans=True)
    if (hidden.dtype != torch.bfloat16 or table.dtype != torch.bfloat16 or hidden.device.type != "cpu"
            or table.device.type != "cpu" or not table.is_contiguous() or v % TILE_N or h % TILE_K
            or not available()):
        return None
    flat = hidden.reshape(-1, h)
    rows = flat.shape[0]
    a = padded_rows(rows, h)
    a[:rows].copy_(flat)
    offsets = torch.tensor([0, rows], dtype=torch.int64)
    y = extension().woq_grouped(a, offsets, table.view(torch.uint8), torch.empty(0), FORMATS["bf16"], v, h, h, 0, 0,
                                True)
    return y.reshape(*hidden.shape[:-1], v)


def dense_f32(x: torch.Tensor, table: torch.Tensor, trans: bool) -> torch.Tensor | None:
    """x fp32 [..., K] times a bf16 matrix read in place by the fp32 engine: table [K, N] (`trans` False) or its
    transpose ([N, K], True: a linear layer's weight). None where the engine does not run here, does not cover the
    shapes, or a gradient is needed (the engine has no backward)."""
    if torch.is_grad_enabled() and (x.requires_grad or table.requires_grad):
        return None
    k = x.shape[-1]
    n = table.shape[0] if trans else table.shape[1]
    if (table.dtype != torch.bfloat16 or x.device.type != "cpu" or table.device.type != "cpu"
            or table.shape[1 if trans else 0] != k or n % TILE_N or k % 8 or not fp32_available()):
        return None
    flat = x.reshape(-1, k).contiguous()
    return fp32_extension().dense_bf16_f32(flat, table.contiguous(), trans).reshape(*x.shape[:-1], n)


def fused_sample(raw: torch.Tensor, table: torch.Tensor, uniforms: torch.Tensor, rows: torch.Tensor,
                 probs_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`dgemma.sampler.fast_sample`'s work for 16-bit head outputs, by the native kernel (csrc/sample.cpp): the same
    steps and the same lookup table, with its own exp and summation order (so the same distributions, not the same
    bits). None where the kernel does not run here or does not cover the tensors."""
    v = raw.shape[-1]
    if (raw.element_size() != 2 or raw.device.type != "cpu" or v % 16 or not available()
            or (probs_out is not None and (probs_out.dtype not in (torch.bfloat16, torch.float32)
                                           or not probs_out.is_contiguous()))):
        return None
    probs = probs_out if probs_out is not None else torch.empty(0, dtype=torch.float32)
    if raw.dim() != 3 or raw.stride(-1) != 1 or raw.stride(0) != raw.shape[1] * raw.stride(1):
        raw = raw.contiguous()  # the kernel takes evenly spaced positions (the native head's padded rows) as they are
    sampled, argmax, ent = extension().fused_sample(raw.view(torch.int16), table.contiguous(),
                                                    uniforms.to(torch.float64).contiguous(), rows.to(torch.bool),
                                                    probs)
    return sampled.to(raw.device), argmax, ent


def combine(y: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """bf16 [T, H]: expert outputs y (fp32 [T k, H], rows in `perm` order: row j is assignment perm[j] = t k + choice)
    rounded to bf16, times their weights [T, k], summed over each token's k choices in fp32 and rounded once; the
    same bits as `dgemma.model.Experts`' torch ops, in one pass."""
    slot = torch.empty_like(perm)
    slot[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return extension().moe_combine(y.contiguous(), slot, weights.reshape(-1).float().contiguous(), weights.shape[1])


# -- adopting a loaded QTensor ---------------------------------------------------------------------------------------
def covers(n: int, k: int, block: int, fmt: str = "int4") -> bool:
    """Whole tiles, and scale blocks of whole tiles (NVFP4: its two 16-input blocks per tile)."""
    whole = block % TILE_K == 0 or (fmt == "nvfp4" and block == NVFP4_BLOCK)
    return n % TILE_N == 0 and k % TILE_K == 0 and whole and k % block == 0


def adopt(q: QTensor) -> QTensor:
    """`q` in the native kernel's layout where that kernel runs here and covers q's format and shape; else `q`."""
    if q.device.type != "cpu" or isinstance(q, TileTensor) or not tiles_available():
        return q
    made = to_tiles(q)
    return q if made is None else made


def to_tiles(q: QTensor) -> TileTensor | None:
    """The tile layout of an int4 / NVFP4 / FP8 QTensor (None for other schemes or uncovered shapes)."""
    n, k = q.shape[-2:]
    name = q.scheme
    if name == "int4":
        if not covers(n, k, q.group):
            return None
        return TileTensor(_tiles(q.nibbles(), 4), tile_scales(q.scales().to(torch.bfloat16)),
                         fmt="int4", block=q.group, scheme=name, shape=tuple(q.shape))
    if name == "nvfp4":
        if not covers(n, k, NVFP4_BLOCK, "nvfp4"):
            return None
        return TileTensor(_tiles(q.packed, 4), tile_scales(q.scale),
                         out_scale=q.global_scale.float().contiguous(), out_divides=q.global_divides, fmt="nvfp4",
                         block=NVFP4_BLOCK, scheme=name, shape=tuple(q.shape))
    if name in ("fp8-channel", "fp8-block"):
        block = k if name == "fp8-channel" else q.block_in
        if not covers(n, k, block, "fp8"):
            return None
        if name == "fp8-channel":
            s = q.scale.float().reshape(*q.shape[:-1], 1)
        else:
            s = q.scale_inv.float().index_select(-2, q.row_block)
        return TileTensor(_tiles(q.weight.view(torch.uint8), 8), tile_scales(s), fmt="fp8",
                         block=block, scheme=name, shape=tuple(q.shape))
    return None


def _tiles(packed: torch.Tensor, bits: int, native: bool | None = None) -> torch.Tensor:
    """Packed codes ([E,] N, K/2 for 4 bits, K for 8) in the tile layout: the extension's one-pass repack where it
    is built (`native` None), else torch ops one expert at a time (temporaries of one expert's size)."""
    mod = (extension() or fp32_extension()) if native is not False else None
    if mod is not None:
        flat = packed.reshape(-1, *packed.shape[-2:]).contiguous()
        out = mod.tile_codes(flat, bits)
        return out[0] if packed.dim() == 2 else out

    def one(p: torch.Tensor) -> torch.Tensor:
        return tile_nibbles(K.unpack_int4(p)) if bits == 4 else _tile_order(p).contiguous()

    if packed.dim() == 2:
        return one(packed)
    n, k = packed.shape[-2], packed.shape[-1] * (2 if bits == 4 else 1)
    rows, row_bytes = (4, 2 * TILE_K) if bits == 4 else (TILE_K // 2, TILE_K)
    out = torch.empty(packed.shape[0], n // TILE_N, k // TILE_K, rows, row_bytes, dtype=torch.uint8)
    for e in range(packed.shape[0]):
        out[e] = one(packed[e])
    return out

