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

from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from ..model import Linear
from ..quant.lowbit import DEFAULT_GROUP, GROUPS, Int4Tensor, Int8Tensor
from ..quant.modules import QExperts, QLinear
from ..quant.qtensor import QTensor, QuantError
from .keys import checkpoint_key


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


def is_quantized_linear(name: str) -> bool:
    """dgemma parameter names that int8/int4 quantize: every linear layer but the router (small, and its top-k
    choice is sensitive), plus the fused experts."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return True
    return name.endswith(".weight") and any(
        p in name for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def load_into(model: torch.nn.Module, files: dict, q: DgemmaQuant, device: torch.device) -> tuple[dict, set[str]]:
    """Swap QLinear / QExperts into `model` for every weight stored in dgemma's int8/int4 layout. Returns the
    checkpoint keys left for the dense loader and the dgemma parameter names replaced (the loader's contract)."""
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
