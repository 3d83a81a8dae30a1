"""dgemma's own weight-only schemes (int8 per channel, int4 group-wise), a 16-bit weight that computes in fp32, and
their safetensors layout.

On-disk layout (config.json `quantization_config = {"quant_method": "dgemma", "scheme": "int8" | "int4",
"group_size": G, "version": 1, "ignore": [...]}`); every other tensor is stored as in a plain checkpoint:

- int8, per output channel, symmetric: `P.weight` int8 [out, in], `P.weight_scale` float32 [out];
  W = q * scale[row], q in [-127, 127], scale = max|row| / 127.
- int4, groups of G inputs along each row, symmetric: `P.weight_packed` uint8 [out, in/2] (element 2k in the low
  nibble, codes 0..15), `P.weight_scale` bfloat16 [out, in/G]; W = (q - 8) * scale[row, col // G], q - 8 in
  [-8, 7], scale = max|group| / 7 (rounded to bf16 before the codes are chosen).
- The fused experts keep the model's fused tensors: `...experts.gate_up_proj` ([E, 2I, H]) / `...down_proj`
  ([E, H, I]) become `...experts.gate_up_proj` int8 + `...experts.gate_up_proj_scale` [E, 2I] (int8) or
  `...experts.gate_up_proj_packed` + `...experts.gate_up_proj_scale` [E, 2I, H/G] (int4).
P is a linear layer's save_pretrained prefix (`model.decoder.layers.N.self_attn.q_proj`, ...). The router, the
embedding and the norms stay dense; so do the layers named in `ignore`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..keys import checkpoint_key
from ..numerics import linear as dense_linear
from . import kernels as K
from .qtensor import QTensor, QuantError, register

INT8_MAX = 127
INT4_MAX = 7
DEFAULT_GROUP = 64
GROUPS = (32, 64, 128)
PACK_ROWS = 64  # below this many rows the fused low-bit kernels beat expand + fp32 GEMM (benchmarks/NOTES.md)
MODE = {"kernel": "auto"}  # "auto" (measured choice) or "dequant" (expand + the model's matmul: exact vs dequantize)


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
                     device: torch.device | str = "cpu") -> "Int4Tensor":
        """From dgemma's on-disk layout; on CPU, converted to torch's kernel layout where the kernel applies."""
        device = torch.device(device)
        n, k = shape[-2], shape[-1]
        if device.type == "cpu" and K.int4_pack_supported(n, k, group):
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
            if _rows(x) >= PACK_ROWS and self.out_features % 64 == 0 and x.dtype != torch.float16:
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
    """A bf16/fp16 weight kept in 16 bits and multiplied in the activations' dtype (expanded one matrix at a
    time into a reused buffer): half the memory of an fp32 copy, without the slow 16-bit CPU matmul."""

    weight: torch.Tensor
    scheme: str = "dense16"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        return _pick(self.weight, index).to(dtype)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        w = _pick(self.weight, index)
        if w.dtype == x.dtype:
            return dense_linear(x, w)
        buf = K.SCRATCH.get(tuple(w.shape), x.dtype, x.device).copy_(w)
        return dense_linear(x, buf)


def keep_16bit_storage(model: torch.nn.Module, compute: torch.dtype = torch.float32) -> int:
    """Make a model loaded in bf16/fp16 compute in `compute`: every dense Linear keeps its 16-bit weight (as a
    Dense16Tensor in a QLinear) and so does the token table (upcast per gathered row / per vocabulary chunk, see
    dgemma.model.Embedding); the other floating parameters (norms, scalars, the router's scales) are converted.
    Returns the number of linear layers wrapped."""
    from ..model import Embedding, Linear
    from .modules import QLinear

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


# -- reading dgemma's layout -----------------------------------------------------------------------------------------
@dataclass
class DgemmaQuant:
    scheme: str  # "int8" | "int4"
    group: int
    ignore: list[str]
    source: str


def parse_config(qc: dict, src: str) -> DgemmaQuant:
    """config.json's quantization_config for quant_method "dgemma" (QuantError naming the field when wrong)."""
    scheme = qc.get("scheme")
    if scheme not in ("int8", "int4"):
        raise QuantError(f"{src}: quantization_config.scheme must be 'int8' or 'int4', got {scheme!r}")
    group = qc.get("group_size", DEFAULT_GROUP if scheme == "int4" else None)
    if scheme == "int4" and group not in GROUPS:
        raise QuantError(f"{src}: quantization_config.group_size must be one of {list(GROUPS)}, got {group!r}")
    if scheme == "int8" and group is not None:  # int8 is per channel: no groups
        raise QuantError(f"{src}: quantization_config.group_size must be absent (null) for int8 (per-channel "
                         f"scales), got {group!r}")
    version = qc.get("version", 1)
    if version != 1:
        raise QuantError(f"{src}: quantization_config.version {version!r} is newer than this dgemma reads (1)")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list):
        raise QuantError(f"{src}: quantization_config.ignore must be a list of module names")
    return DgemmaQuant(scheme, int(group or 0), list(ignore), src)


def read_qtensor(get, shape_of, dtype_of, where, q: DgemmaQuant, base: str, shape: tuple[int, ...],
                 device: torch.device) -> QTensor:
    """One quantized weight of dgemma's layout. `base` is the weight's key without its suffix: `P.weight` for a
    linear layer (suffixes `weight` / `weight_packed` + `weight_scale`) or `...experts.gate_up_proj` (suffixes
    "" / `_packed` + `_scale`). `get/shape_of/dtype_of/where` read tensors by key."""
    *lead, out, inn = shape
    if q.scheme == "int8":
        wkey, skey = weight_keys("int8", base)
        _expect(shape_of, dtype_of, where, wkey, tuple(shape), "I8")
        _expect(shape_of, dtype_of, where, skey, (*lead, out), "F32")
        return Int8Tensor(get(wkey).to(device, copy=True), get(skey).to(device, copy=True), shape=tuple(shape))
    if inn % q.group:
        raise QuantError(f"{where(base)}: int4 group {q.group} does not divide in_features {inn}")
    wkey, skey = weight_keys("int4", base)
    _expect(shape_of, dtype_of, where, wkey, (*lead, out, inn // 2), "U8")
    _expect(shape_of, dtype_of, where, skey, (*lead, out, inn // q.group), "BF16")
    return Int4Tensor.from_nibbles(get(wkey), get(skey), q.group, tuple(shape), device)


def _expect(shape_of, dtype_of, where, key: str, shape: tuple[int, ...], dtype: str) -> None:
    try:
        got = tuple(shape_of(key))
    except KeyError:
        raise QuantError(f"{where(key)}: missing (the int8/int4 layout config.json announces needs it)") from None
    if got != shape:
        raise QuantError(f"{where(key)}: shape {list(got)}, expected {list(shape)}")
    if dtype_of(key) != dtype:
        raise QuantError(f"{where(key)}: dtype {dtype_of(key)}, expected {dtype}")


def weight_keys(scheme: str, base: str) -> tuple[str, str]:
    """The (codes, scale) keys a quantized weight `base` is stored under (see the module docstring)."""
    if scheme == "int8":
        return base, base + "_scale"
    return base + "_packed", base + "_scale"


def quantize_weight(scheme: str, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_int8(w) if scheme == "int8" else quantize_int4(w, group)


def is_quantized_linear(name: str) -> bool:
    """dgemma parameter names that int8/int4 quantize: every linear layer but the router (small, and its top-k
    choice is sensitive), plus the fused experts."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return True
    return name.endswith(".weight") and any(
        p in name for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


__all__ = ["Int8Tensor", "Int4Tensor", "Dense16Tensor", "quantize_int8", "quantize_int4", "keep_16bit_storage",
           "parse_config", "read_qtensor", "DgemmaQuant", "weight_keys", "is_quantized_linear"]


def load_into(model: torch.nn.Module, files: dict, q: DgemmaQuant, device: torch.device) -> tuple[dict, set[str]]:
    """Swap QLinear / QExperts into `model` for every weight stored in dgemma's int8/int4 layout. Returns the
    checkpoint keys left for the dense loader and the dgemma parameter names replaced (the loader's contract)."""
    from safetensors import SafetensorError, safe_open

    from ..model import Linear
    from .modules import QExperts, QLinear

    meta: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in sorted(set(files.values())):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise QuantError(f"{f}: not a readable safetensors file ({e})") from None

    shards = sorted({str(f) for f in files.values()})
    stored_in = shards[0] if len(shards) == 1 else f"the checkpoint's {len(shards)} weight files"

    def where(key: str) -> str:
        return f"{files[key]}: tensor {key!r}" if key in files else f"{stored_in}: tensor {key!r}"

    def shape_of(key: str) -> tuple[int, ...]:
        if key not in meta:
            raise KeyError(key)
        return meta[key][0]

    def get(key: str) -> torch.Tensor:
        with safe_open(str(files[key]), framework="pt") as h:  # re-opened per tensor: no pile-up of mapped pages
            return h.get_tensor(key).clone()

    consumed: set[str] = set()
    replaced: set[str] = set()
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, Linear) or not is_quantized_linear(full + ".weight"):
                continue
            base = checkpoint_key(full + ".weight")
            codes, scale = weight_keys(q.scheme, base)
            if base[: -len(".weight")] in q.ignore or (codes not in meta and scale not in meta):
                continue
            if q.scheme == "int8" and meta.get(codes, ((), ""))[1] != "I8" and scale not in meta:
                continue  # a dense weight under the same key
            out, inn = child.weight.shape
            setattr(mod, child_name, QLinear(read_qtensor(get, shape_of, lambda k: meta[k][1], where, q, base,
                                                          (out, inn), device)))
            consumed.update((codes, scale))
            replaced.add(full + ".weight")
    cfg = model.config
    for i, layer in enumerate(model.layers):
        bases = [checkpoint_key(f"layers.{i}.experts.{p}") for p in ("gate_up_proj", "down_proj")]
        present = [weight_keys(q.scheme, b)[1] in meta for b in bases]
        if not any(present):
            continue
        e, n_i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        gu = read_qtensor(get, shape_of, lambda k: meta[k][1], where, q, bases[0], (e, 2 * n_i, h), device)
        dn = read_qtensor(get, shape_of, lambda k: meta[k][1], where, q, bases[1], (e, h, n_i), device)
        layer.experts = QExperts(gu, dn)
        for b in bases:
            consumed.update(weight_keys(q.scheme, b))
        replaced.update({f"layers.{i}.experts.gate_up_proj", f"layers.{i}.experts.down_proj"})
    return {k: f for k, f in files.items() if k not in consumed}, replaced
