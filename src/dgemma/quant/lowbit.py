"""dgemma's own weight-only schemes (int8 per channel, int4 group-wise) and a 16-bit weight that computes in fp32;
their checkpoint layout is read by dgemma.checkpoint.lowbit and written by dgemma.checkpoint.quantize."""


from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..numerics import linear as dense_linear
from ..model import Embedding, Linear
from . import kernels as K
from . import native
from .modules import QLinear
from .qtensor import MODE, QTensor, QuantError, register

INT8_MAX = 127
INT4_MAX = 7
DEFAULT_GROUP = 64
GROUPS = (32, 64, 128)
PACK_ROWS = 64  # below this many rows the fused low-bit kernels beat expand + fp32 GEMM (benchmarks/NOTES.md)


def _pick(t: torch.Tensor, index: int | None) -> torch.Tensor:
    return t if index is None else t[index]


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


# -- quantizers (also used by `dgemma quantize`) -------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scale float32 [..., out])."""
    w = w.float()
    scale = w.abs().amax(dim=-1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (packed uint8 [..., out, in/2], scale bfloat16 [..., out, in/group])."""
    *lead, out, inn = w.shape
    if inn % group or inn % 2:
        raise QuantError(f"int4 group {group} does not divide in_features {inn}")
    g = w.float().reshape(*lead, out, inn // group, group)
    scale = (g.abs().amax(dim=-1) / INT4_MAX).to(torch.bfloat16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(g / s.unsqueeze(-1)).clamp_(-8, INT4_MAX).add_(K.INT4_ZERO).to(torch.uint8)
    return K.pack_int4(q.reshape(*lead, out, inn)), scale


# -- QTensors ------------------------------------------------------------------------------------------------------
@register("int8")
@dataclass
class Int8Tensor(QTensor):
    """weight int8 [..., out, in]; scale float32 [..., out]. W = q * scale[row]."""

    weight: torch.Tensor
    scale: torch.Tensor
    scheme: str = "int8"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        q, s = _pick(self.weight, index), _pick(self.scale, index)
        return (q.float() * s.float().unsqueeze(-1)).to(dtype)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if self.is_fused and index is None:
            raise ValueError(f"int8 QTensor of shape {list(self.shape)} holds experts: pass index=")
        q, s = _pick(self.weight, index), _pick(self.scale, index)
        if MODE["kernel"] == "dequant" or x.device.type != "cpu" or x.dtype == torch.float16:
            return dense_linear(x, self.dequantize(x.dtype, index))
        if _rows(x) < PACK_ROWS:
            return K.int8_linear_pack(x, q, s)
        return K.int8_linear_dequant(x, q, s)


@functools.lru_cache(maxsize=16)
def _kernel_order(n: int, k: int) -> torch.Tensor:
    """For torch's CPU int4pack layout of an [n, k] matrix: the row-major index (n * k + col) whose code each
    nibble of the packed tensor holds (low nibble first). Found by packing the index itself 4 bits at a time."""
    idx = torch.arange(n * k, dtype=torch.int64).view(n, k)
    src = torch.zeros(n * k, dtype=torch.int64)
    for d in range((max(1, n * k - 1).bit_length() + 3) // 4):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((idx >> (4 * d)) & 15).to(torch.int32), 1)
        src |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).long() << (4 * d)
    return src


@register("int4")
@dataclass
class Int4Tensor(QTensor):
    """packed uint8 [..., out, in/2]; scale bfloat16 [..., out, in/group]; W = (q - 8) * scale[row, col // group].
    With `kernel_layout` the packed bytes are in torch's CPU int4pack order and `scale` is the kernel's
    scale-and-zero table [..., in/group, out, 2] (zeros 0), both built once at load, and `linear` runs
    `torch._weight_int4pack_mm_for_cpu`; otherwise they are in dgemma's nibble order."""

    packed: torch.Tensor
    scale: torch.Tensor
    group: int = DEFAULT_GROUP
    kernel_layout: bool = False
    scheme: str = "int4"
    shape: tuple[int, ...] = ()

    @classmethod
    def from_nibbles(cls, packed: torch.Tensor, scale: torch.Tensor, group: int, shape: tuple[int, ...],
                     device: torch.device | str = "cpu", pack: bool | None = None) -> "Int4Tensor":
        """From dgemma's on-disk layout; on CPU, converted to torch's kernel layout where that kernel applies
        (`pack` None), unless the native kernel covers the shape (QLinear / QExperts then repack the nibbles
        into its tiles)."""
        device = torch.device(device)
        n, k = shape[-2], shape[-1]
        if pack is None:
            pack = not (native.tiles_available() and native.covers(n, k, group))
        if device.type == "cpu" and K.int4_pack_supported(n, k, group) and pack:
            if packed.dim() == 3:
                out = torch.empty_like(packed, device=device)
                sz = torch.empty(packed.shape[0], k // group, n, 2, dtype=torch.bfloat16)
                for e in range(packed.shape[0]):  # one expert at a time: no [E, out, in] temporary
                    out[e], sz[e] = K.int4_to_kernel_layout(packed[e], scale[e])
            else:
                out, sz = K.int4_to_kernel_layout(packed, scale)
            return cls(out, sz, group, True, shape=tuple(shape))
        return cls(packed.to(device), scale.to(device=device, dtype=torch.bfloat16), group, False, shape=tuple(shape))

    def nibbles(self, index: int | None = None) -> torch.Tensor:
        """The packed codes in dgemma's nibble order ([out, in/2] or [E, out, in/2])."""
        p = _pick(self.packed, index)
        if not self.kernel_layout:
            return p
        n, k = self.shape[-2], self.shape[-1]
        src = _kernel_order(n, k)
        flat = p.reshape(-1, n * k // 2)
        codes = torch.empty(flat.shape[0], n * k, dtype=torch.uint8)
        for i in range(flat.shape[0]):
            nib = torch.stack([flat[i] & 15, flat[i] >> 4], dim=-1).reshape(-1)
            codes[i].index_copy_(0, src, nib)
        return K.pack_int4(codes.view(*p.shape[:-2], n, k))

    def scales(self, index: int | None = None) -> torch.Tensor:
        """The group scales [..., out, in/group] in either layout."""
        s = _pick(self.scale, index)
        return s[..., 0].transpose(-1, -2) if self.kernel_layout else s

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        p, s = self.nibbles(index), self.scales(index)
        codes = K.unpack_int4(p).float().sub_(K.INT4_ZERO)
        g = codes.view(*codes.shape[:-1], codes.shape[-1] // self.group, self.group) * s.float().unsqueeze(-1)
        return g.view(codes.shape).to(dtype)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        if self.is_fused and index is None:
            raise ValueError(f"int4 QTensor of shape {list(self.shape)} holds experts: pass index=")
        if self.kernel_layout and MODE["kernel"] == "auto" and x.device.type == "cpu":
            packed, sz = _pick(self.packed, index), _pick(self.scale, index)
            if (_rows(x) >= PACK_ROWS and self.out_features % K.int4pack_block() == 0
                    and x.dtype != torch.float16):
                return K.int4_linear_blocks(x, packed, sz, self.group)
            return K.int4_linear_pack(x, packed, sz, self.group)
        if not self.kernel_layout and MODE["kernel"] == "auto" and x.device.type == "cpu":
            return K.int4_linear_dequant(x, _pick(self.packed, index), _pick(self.scale, index), self.group)
        return dense_linear(x, self.dequantize(x.dtype, index))

    def to(self, device: str | torch.device) -> "Int4Tensor":
        device = torch.device(device)
        if device.type != "cpu" and self.kernel_layout:  # the CPU kernel order means nothing elsewhere
            return Int4Tensor(self.nibbles().to(device), self.scales().to(device), self.group, False, shape=self.shape)
        return super().to(device)  # type: ignore[return-value]


@register("dense16")
@dataclass
class Dense16Tensor(QTensor):
    """A bf16/fp16 weight kept in 16 bits and multiplied in the activations' dtype: half the memory of an fp32
    copy, without the slow 16-bit CPU matmul. A bf16 weight times fp32 activations is read in place by the fp32
    engine where it runs (`native.dense_f32`), else expanded one matrix at a time into a reused buffer."""

    weight: torch.Tensor
    scheme: str = "dense16"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        return _pick(self.weight, index).to(dtype)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        w = _pick(self.weight, index)
        if w.dtype == x.dtype:
            return dense_linear(x, w)
        fast = native.dense_f32(x, w, trans=True) if MODE["kernel"] == "auto" else None  # read in place (fp32 engine)
        if fast is not None:
            return fast
        buf = K.SCRATCH.get(tuple(w.shape), x.dtype, x.device).copy_(w)
        return dense_linear(x, buf)


def keep_16bit_storage(model: torch.nn.Module, compute: torch.dtype = torch.float32) -> int:
    """Make a model loaded in bf16/fp16 compute in `compute`: every dense Linear keeps its 16-bit weight (as a
    Dense16Tensor in a QLinear) and so does the token table (upcast per gathered row / per vocabulary chunk, see
    dgemma.model.Embedding); the other floating parameters (norms, scalars, the router's scales) are converted.
    Returns the number of linear layers wrapped."""
    wrapped = 0
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, Linear) and child.weight.dtype in (torch.bfloat16, torch.float16):
                w = child.weight.detach()
                setattr(mod, child_name, QLinear(Dense16Tensor(w, shape=tuple(w.shape))))
                wrapped += 1
    tables = [m for m in model.modules() if isinstance(m, Embedding)]
    kept = {id(m.weight) for m in tables if m.weight.dtype in (torch.bfloat16, torch.float16)}
    for m in tables:
        m.compute_dtype = compute
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != compute and id(p) not in kept:
            p.data = p.data.to(compute)
    return wrapped
