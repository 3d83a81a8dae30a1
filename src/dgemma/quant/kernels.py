"""Weight-only int8 / int4 matrix multiplies on CPU (and their portable fallbacks).

Two ways to multiply activations by a low-bit weight, measured on this project's CPUs (benchmarks/quant_kernels.py,
results in benchmarks/NOTES.md):
- "dequant": expand the weight (one matrix, or one expert) into a reused fp32 buffer and run the fp32 GEMM. For
  int8 per-channel the scale is applied to the output instead (x @ (q * s).T == (x @ q.T) * s), so the expansion
  is a single int8 -> fp32 copy.
- "pack": torch's fused weight-only kernels, `torch._weight_int8pack_mm` and `torch._weight_int4pack_mm_for_cpu`
  (weights pre-packed once by `_convert_weight_to_int4pack_for_cpu`). They are fast only with bf16/fp16
  activations (with fp32 activations torch 2.13 takes a scalar path ~30-100x slower), so fp32 activations are
  cast to bf16 around the call; the result is cast back.

`choose` picks per call from the activation dtype and row count, using the crossover measured on this CPU kind.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..numerics import MIN_ROWS, ROW_INVARIANT

INT4_ZERO = 8  # int4 codes are unsigned 0..15 around 8: w = (q - 8) * scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # NVFP4's 4-bit float codes 0..7; bit 3 is the sign


def e2m1_table() -> torch.Tensor:
    """float32 [16]: the value of every 4-bit e2m1 code (bit 3 = sign)."""
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat([pos, -pos])


# -- int4 nibble layout (dgemma's on-disk layout) ------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] in 0..15 -> uint8 [..., K/2]; element 2k in the low nibble (the NVFP4 order)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K] in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_int4(packed: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K/2] codes + [N, K/group] scales -> W [N, K] = (q - 8) * scale[n, k // group], into `out` if given."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=packed.device)
    out.copy_(unpack_int4(packed))
    w = out.view(n, k // group, group)
    w.sub_(INT4_ZERO).mul_(scales.to(dtype).unsqueeze(-1))
    return out


# -- the kernels -------------------------------------------------------------------------------------------------
class Scratch:
    """A growable fp32/bf16 buffer reused across calls so expansions do not allocate per expert."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        key = (dtype, device)
        buf = self.buffers.get(key)
        # a buffer made under inference_mode cannot be written outside it (and the other way round is fine)
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if buf is None or buf.numel() < n or stale:
            buf = torch.empty(n, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:n].view(shape)


SCRATCH = Scratch()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flatten x to [rows, in]; inside row_invariant() pad small CPU row counts to MIN_ROWS like numerics.linear."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < MIN_ROWS and x.device.type == "cpu" and ROW_INVARIANT.get():
        flat = F.pad(flat, (0, 0, 0, MIN_ROWS - rows))
    return flat, rows


def int8_linear_dequant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q * scale).T via an int8 -> x.dtype copy into scratch, the GEMM, and a per-column scale."""
    flat, rows = _rows(x)
    w = SCRATCH.get(tuple(q.shape), x.dtype, x.device).copy_(q)
    out = F.linear(flat, w).mul_(scale.to(x.dtype))
    return out[:rows].reshape(*x.shape[:-1], q.shape[0])


def int8_linear_pack(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torch._weight_int8pack_mm; fp32 activations go through bf16 (the kernel's fast path)."""
    flat, rows = _rows(x)
    act = flat if flat.dtype in (torch.bfloat16, torch.float16) else flat.to(torch.bfloat16)
    out = torch._weight_int8pack_mm(act.contiguous(), q, scale.to(act.dtype))
    return out[:rows].to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def int4_linear_dequant(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    flat, rows = _rows(x)
    n, k = packed.shape[0], packed.shape[1] * 2
    w = dequant_int4(packed, scales, group, x.dtype, out=SCRATCH.get((n, k), x.dtype, x.device))
    return F.linear(flat, w)[:rows].reshape(*x.shape[:-1], n)


def int4_to_kernel_layout(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dgemma's int4 layout -> (torch's CPU int4pack weight, its [K/group, N, 2] scale-and-zero table in bf16).
    torch's formula is (q - 8) * scale + zero, so zero = 0 reproduces ours exactly."""
    if packed.shape[0] % int4pack_block() == 0:
        kernel_weight = repack_int4_blocks(packed)
    else:
        kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)
    s = scales.t().to(torch.bfloat16)
    return kernel_weight, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


@functools.cache
def int4pack_block() -> int:
    """The rows per block of torch's CPU int4pack order on this CPU: 64 where torch's kernels use AVX-512, 32 with
    AVX2 only (found by packing a probe with torch's own op)."""
    probe = (torch.arange(64, dtype=torch.int32) // 16).view(64, 1).expand(64, 2).contiguous()  # row r: r // 16
    first = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)[0])
    return 64 if first >> 4 == 2 else 32  # byte 0 holds row 0 and row B / 2 (code 2 for row 32, 1 for row 16)


def repack_int4_blocks(packed: torch.Tensor) -> torch.Tensor:
    """dgemma's nibble order -> torch 2.13's CPU int4pack order for N % int4pack_block() == 0, with byte operations
    only (what `_convert_weight_to_int4pack_for_cpu` produces, ~10x faster; tests compare the two). That order takes
    blocks of B rows (64 with AVX-512, 32 with AVX2); within a block, for each input column k, B / 2 bytes whose byte
    i holds row i (low nibble) and row i + B / 2 (high nibble)."""
    n, half = packed.shape
    bn = int4pack_block()
    blocks = packed.view(n // bn, 2, bn // 2, half)
    a, b = blocks[:, 0], blocks[:, 1]  # rows i and i + B/2 of each block: [blocks, B/2, K/2]
    even = (a & 0xF) | (b << 4)  # column 2j
    odd = (a >> 4) | (b & 0xF0)  # column 2j + 1
    return torch.stack([even, odd], dim=2).permute(0, 3, 2, 1).contiguous().view(n, half)


def dequant_int4_blocks_t(kernel_weight: torch.Tensor, scale_zeros: torch.Tensor, group: int, dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """W.T [K, N] in `dtype` straight from torch's CPU int4pack order (as `repack_int4_blocks` writes it, N a
    multiple of `int4pack_block()`): W[n, k] = (q - 8) * scale (dgemma's tables have zero points 0). The transposed
    result lets every copy run along B / 2 contiguous rows; `F.linear(x, result.t())` multiplies without a further
    copy."""
    n, half = kernel_weight.shape
    k = half * 2
    bn = int4pack_block()
    blocks = kernel_weight.view(n // bn, k, bn // 2).transpose(0, 1)  # [K, blocks, B/2]: byte i = rows i, i + B/2
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=kernel_weight.device)
    w = out.view(k, n // bn, 2, bn // 2)
    w[:, :, 0].copy_(blocks & 0xF)
    w[:, :, 1].copy_(blocks >> 4)
    scale = scale_zeros[..., 0].to(dtype).contiguous()  # a strided broadcast operand is ~15x slower in bf16
    out.view(k // group, group, n).sub_(INT4_ZERO).mul_(scale[:, None, :])
    return out


def int4_linear_blocks(x: torch.Tensor, kernel_weight: torch.Tensor, scale_zeros: torch.Tensor,
                       group: int) -> torch.Tensor:
    """x @ W.T through a W.T expanded into scratch from the int4pack order, and the GEMM in x.dtype (for many
    rows the GEMM beats the fused kernel, which is tuned for a few)."""
    flat, rows = _rows(x)
    n, k = kernel_weight.shape[0], kernel_weight.shape[1] * 2
    wt = dequant_int4_blocks_t(kernel_weight, scale_zeros, group, x.dtype, out=SCRATCH.get((k, n), x.dtype, x.device))
    return F.linear(flat, wt.t())[:rows].reshape(*x.shape[:-1], n)


def int4_linear_pack(x: torch.Tensor, kernel_weight: torch.Tensor, scale_zeros: torch.Tensor,
                     group: int) -> torch.Tensor:
    flat, rows = _rows(x)
    act = flat if flat.dtype == torch.bfloat16 else flat.to(torch.bfloat16)
    out = torch._weight_int4pack_mm_for_cpu(act.contiguous(), kernel_weight, group, scale_zeros)
    n = scale_zeros.shape[1]
    return out[:rows].to(x.dtype).reshape(*x.shape[:-1], n)


def int4_pack_supported(n: int, k: int, group: int) -> bool:
    """torch's CPU int4pack kernel needs N % 16 == 0 and whole groups."""
    return (n % 16 == 0 and k % group == 0 and group in (32, 64, 128, 256)
            and hasattr(torch, "_weight_int4pack_mm_for_cpu"))
