"""The published quantized layouts: QTensor subclasses with each format's own dequantization formula, and detection
of the format from the files its producer writes.

- NVFP4 (ModelOpt `hf_quant_config.json` and compressed-tensors `nvfp4-pack-quantized`): two e2m1 codes per byte,
  element 2k in the low nibble; code bit 3 is the sign, bits 0-2 index [0, .5, 1, 1.5, 2, 3, 4, 6]; one
  float8_e4m3fn scale per 16 inputs; one float32 global scale per matrix that ModelOpt multiplies by
  (`weight_scale_2`) and compressed-tensors divides by (`weight_global_scale`).
- FP8 per channel (compressed-tensors `float-quantized`): float8_e4m3fn weight, one scale per output row.
- FP8 blocks (HF fine-grained, `quant_method: fp8`): float8_e4m3fn weight, float32 `weight_scale_inv` per 128x128
  block (fused experts [E, 2I, H] included: a block may straddle the gate/up boundary).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..numerics import linear as dense_linear
from ..quant import lowbit
from ..quant.kernels import SCRATCH, e2m1_table
from ..quant.qtensor import QTensor, QuantError, register
from .lowbit import parse_config

FP8 = torch.float8_e4m3fn
NVFP4_GROUP = 16


def _byte_table() -> torch.Tensor:
    """float32 [256, 2]: the two values a packed byte holds, low nibble first."""
    codes = torch.arange(256)
    return e2m1_table()[torch.stack([codes & 0xF, codes >> 4], dim=-1)]


_BYTES = _byte_table()
_PAIRS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256 * 256] int32 (16-bit dtypes) or int64 (fp32): entry c * 256 + b holds the two values of packed byte b
    (low nibble first) times the float8 scale of code c, as one word. e2m1 x e4m3 has at most 5 significant bits,
    so every entry is exact in bf16, fp16 and fp32 (float8's NaN codes give NaN, as the formula does)."""
    key = (dtype, torch.device(device))
    if key not in _PAIRS:
        scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
        pairs = (scales[:, None, None] * _BYTES[None]).to(dtype).contiguous()  # [scale, byte, 2]
        word = torch.int64 if dtype == torch.float32 else torch.int32
        _PAIRS[key] = pairs.view(word).reshape(-1).to(device)
    return _PAIRS[key]


def _pick(t: torch.Tensor, index: int | None) -> torch.Tensor:
    return t if index is None else t[index]


@register("nvfp4")
@dataclass
class NVFP4Tensor(QTensor):
    """packed uint8 [..., out, in/2]; scale float8_e4m3fn [..., out, in/16]; global_scale float32 [..., out] (one
    value per row, so a fused gate+up keeps each half's own global scale). W = e2m1 * scale * global_scale
    (ModelOpt) or e2m1 * scale / global_scale (compressed-tensors, `global_divides`)."""

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    global_divides: bool = False
    scheme: str = "nvfp4"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        packed, scale, gs = _pick(self.packed, index), _pick(self.scale, index), _pick(self.global_scale, index)
        out, half = packed.shape[-2:]
        vals = F.embedding(packed.reshape(-1).int(), _BYTES.to(packed.device))  # [n, 2], exact
        vals = vals.view(*packed.shape[:-1], half * 2 // NVFP4_GROUP, NVFP4_GROUP)
        w = (vals * scale.float().unsqueeze(-1)).view(*packed.shape[:-1], half * 2)  # exact: few mantissa bits
        gs = gs.unsqueeze(-1)
        w = w / gs if self.global_divides else w * gs
        return w.to(dtype)

    def expand_unscaled(self, dtype: torch.dtype, index: int | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """e2m1 x block scale [out, in] (exact in `dtype`), without the global scale: one table gather per packed
        byte (`pair_table`) instead of the formula's several passes."""
        packed, scale = _pick(self.packed, index), _pick(self.scale, index)
        n, half = packed.shape[-2:]
        groups = (*packed.shape[:-1], half * 2 // NVFP4_GROUP, NVFP4_GROUP // 2)
        # byte + 256 * scale code; same-dtype in-place add (a uint8 + int32 broadcast add is ~20x slower on CPU)
        idx = SCRATCH.get(groups, torch.int32, packed.device).copy_(packed.view(groups))
        idx.add_(scale.view(torch.uint8).to(torch.int32).mul_(256).unsqueeze(-1))
        table = pair_table(dtype, packed.device)
        words = torch.empty(idx.numel(), dtype=table.dtype, device=packed.device) if out is None else \
            out.view(table.dtype).view(-1)
        torch.index_select(table, 0, idx.view(-1), out=words)
        return words.view(dtype).view(*packed.shape[:-1], half * 2)

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x @ W.T: the unscaled weight expanded into scratch (`expand_unscaled`), the GEMM in x.dtype, and the
        per-row global scale applied to the output columns (in fp32)."""
        if self.is_fused and index is None:
            raise ValueError(f"nvfp4 QTensor of shape {list(self.shape)} holds experts: pass index=")
        if lowbit.MODE["kernel"] == "dequant" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return super().linear(x, index)
        n, k = self.shape[-2:]
        w = self.expand_unscaled(x.dtype, index, out=SCRATCH.get((n, k), x.dtype, x.device))
        gs = _pick(self.global_scale, index).float()
        y = dense_linear(x, w).float()
        y = y / gs if self.global_divides else y * gs
        return y.to(x.dtype)


@register("fp8-channel")
@dataclass
class FP8ChannelTensor(QTensor):
    """weight float8_e4m3fn [..., out, in]; scale [..., out, 1] (stored dtype kept). W = fp8 * scale."""

    weight: torch.Tensor
    scale: torch.Tensor
    scheme: str = "fp8-channel"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        return (_pick(self.weight, index).float() * _pick(self.scale, index).float()).to(dtype)


@register("fp8-block")
@dataclass
class FP8BlockTensor(QTensor):
    """weight float8_e4m3fn [..., out, in]; scale_inv float32 [..., scale_rows, ceil(in / block_in)];
    row_block int64 [out]: the scale row of each weight row (r // 128 for one matrix; per-expert gate and up
    matrices stacked into gate_up keep their own block grids). W[r, c] = q * scale_inv[row_block[r], c // 128]."""

    weight: torch.Tensor
    scale_inv: torch.Tensor
    row_block: torch.Tensor
    block_in: int = 128
    scheme: str = "fp8-block"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        q, s = _pick(self.weight, index), _pick(self.scale_inv, index)
        s = s.index_select(-2, self.row_block).repeat_interleave(self.block_in, dim=-1)[..., : q.shape[-1]]
        return (q.float() * s).to(dtype)

    @property
    def nbytes(self) -> int:
        return super().nbytes - self.row_block.numel() * self.row_block.element_size()


# ---------------------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class QuantFormat:
    """What the checkpoint's files say about its quantization.

    kind: "nvfp4" (ModelOpt or compressed-tensors NVFP4), "fp8-channel" (compressed-tensors FP8), "fp8-block"
    (HF fine-grained FP8), "int8" / "int4" (dgemma's own layout) or "gguf"; compressed-tensors may join two
    with "+". `source` is the file that said so (for error messages and `dgemma info`)."""

    kind: str
    producer: str  # "modelopt", "compressed-tensors", "fp8", "gguf"
    source: str
    block: tuple[int, int] | None = None
    ignore: list[str] = dataclasses.field(default_factory=list)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        names = {"nvfp4": "NVFP4", "fp8-channel": "FP8 per-channel", "fp8-block": "FP8 blocks", "gguf": "GGUF",
                 "int8": "int8 per-channel", "int4": "int4 group-wise"}
        kind = " + ".join(names.get(k, k) for k in self.kind.split("+"))
        if self.block:
            kind += f" {self.block[0]}x{self.block[1]}"
        return f"{kind} ({self.producer})"


def detect(path: Path, config: dict[str, Any]) -> QuantFormat | None:
    """The quantization of a checkpoint directory, from `hf_quant_config.json` (ModelOpt) or config.json's
    `quantization_config`; None for a plain checkpoint. Unknown or inconsistent settings raise QuantError."""
    hf_quant = path / "hf_quant_config.json"
    if hf_quant.is_file():
        try:
            data = json.loads(hf_quant.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QuantError(f"{hf_quant}: not valid JSON ({e})") from None
        q = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(q, dict):
            raise QuantError(f"{hf_quant}: 'quantization' is missing or not an object")
        return _modelopt(q, str(hf_quant))
    qc = config.get("quantization_config")
    if qc is None:
        return None
    src = str(path / "config.json")
    if not isinstance(qc, dict):
        raise QuantError(f"{src}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "modelopt":
        return _modelopt(qc, src)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, src)
    if method == "dgemma":  # dgemma's own int8 / int4 layout (dgemma.quant.lowbit)

        q = parse_config(qc, src)
        return QuantFormat(q.scheme, "dgemma", src, ignore=q.ignore, raw=qc)
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise QuantError(f"{src}: quantization_config.weight_block_size must be [rows, cols], got {block!r} "
                             "(only block-wise fine-grained FP8 is supported)")
        ignore = qc.get("modules_to_not_convert") or []
        return QuantFormat("fp8-block", "fp8", src, block=(block[0], block[1]), ignore=list(ignore), raw=qc)
    raise QuantError(f"{src}: unsupported quantization_config.quant_method {method!r}; dgemma reads modelopt "
                     "(NVFP4), compressed-tensors (FP8 per-channel, NVFP4), fp8 (128x128 blocks) and dgemma "
                     "(int8, int4)")


def _modelopt(q: dict[str, Any], src: str) -> QuantFormat:
    if "quant_algo" not in q and isinstance(q.get("quantization"), dict):  # hf_quant_config.json nested in config
        q = q["quantization"]
    algo = q.get("quant_algo")
    if algo == "MIXED_PRECISION":  # per-layer algorithms: fine when every quantized layer is NVFP4
        layers = q.get("quantized_layers") or {}
        algos = {v.get("quant_algo") for v in layers.values() if isinstance(v, dict)}
        if algos == {"NVFP4"}:
            algo = "NVFP4"
        else:
            raise QuantError(f"{src}: MIXED_PRECISION with quant_algo(s) {sorted(map(str, algos))}; dgemma reads "
                             "ModelOpt 'NVFP4' layers only")
    if algo != "NVFP4":
        raise QuantError(f"{src}: unsupported quant_algo {algo!r}; dgemma reads ModelOpt 'NVFP4'")
    group = q.get("group_size", NVFP4_GROUP)
    if group != NVFP4_GROUP:
        raise QuantError(f"{src}: NVFP4 group_size must be {NVFP4_GROUP}, got {group!r}")
    return QuantFormat("nvfp4", "modelopt", src, ignore=list(q.get("exclude_modules") or []), raw=q)


def _compressed_tensors(qc: dict[str, Any], src: str) -> QuantFormat:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantError(f"{src}: quantization_config.config_groups is missing or empty")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise QuantError(f"{src}: quantization_status {status!r}; only 'compressed' checkpoints hold packed weights")
    kinds = set()
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        fmt = (g.get("format") if isinstance(g, dict) else None) or qc.get("format")
        if not isinstance(w, dict):
            raise QuantError(f"{src}: config_groups.{name}.weights is missing")
        bits, typ, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        if fmt == "nvfp4-pack-quantized" and bits == 4 and typ == "float" and w.get("group_size", 16) == 16:
            kinds.add("nvfp4")
        elif fmt == "float-quantized" and bits == 8 and typ == "float" and strategy in ("channel", "tensor"):
            kinds.add("fp8-channel")
        else:
            raise QuantError(f"{src}: config_groups.{name}: unsupported scheme (format {fmt!r}, {bits}-bit "
                             f"{typ!r}, strategy {strategy!r}); dgemma reads float-quantized FP8 per channel/tensor "
                             "and nvfp4-pack-quantized")
    return QuantFormat("+".join(sorted(kinds)), "compressed-tensors", src, ignore=list(qc.get("ignore") or []),
                       raw=qc)


# ---------------------------------------------------------------------------------------------------------------
# reading: one matrix's tensors -> "parts" (every field has the matrix rows on axis 0), stacked into QTensors
# ---------------------------------------------------------------------------------------------------------------
# Suffixes of the tensors that make up one quantized linear layer, longest first (so `weight_scale_2` is not read
# as `weight_scale` + "_2").
SUFFIXES = ("weight_global_scale", "input_global_scale", "weight_scale_inv", "weight_scale_2", "weight_packed",
            "weight_scale", "input_scale", "weight")
ACTIVATION_SUFFIXES = ("input_scale", "input_global_scale")  # static activation scales: unused by weight-only compute
FLOAT_DTYPES = ("F32", "BF16", "F16")


def split_key(key: str) -> tuple[str, str] | None:
    """'a.b.q_proj.weight_scale' -> ('a.b.q_proj', 'weight_scale'); None when the key has no linear-layer suffix."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


class Reader:
    """Tensors of a safetensors checkpoint by key, read lazily. One file is mapped at a time and `release()` drops
    it, so the pages of tensors already copied out do not stay mapped (and counted) while the rest loads."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._file: Path | None = None
        self._handle: Any = None

    def _open(self, key: str):
        file = self.files[key]
        if file != self._file:
            self.release()
            try:
                self._handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, RuntimeError) as e:  # RuntimeError: cannot be mapped
                raise QuantError(f"{file}: not a readable safetensors file ({e})") from None
            self._file = file
        return self._handle

    def release(self) -> None:
        self._handle, self._file = None, None

    def where(self, key: str) -> str:
        return f"{self.files.get(key, '?')}: tensor {key!r}"

    def _slice(self, key: str):
        try:
            return self._open(key).get_slice(key)
        except SafetensorError as e:
            raise QuantError(f"{self.where(key)} cannot be read ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(key).get_tensor(key)
        except SafetensorError as e:
            raise QuantError(f"{self.where(key)} cannot be read ({e})") from None


def matrix_kind(r: Reader, group: dict[str, str], what: str) -> str:
    """The layout of one linear layer's tensors: "nvfp4", "fp8-channel", "fp8-block" or "dense"."""
    wkey = group.get("weight_packed", group.get("weight"))
    if wkey is None:
        raise QuantError(f"{r.where(next(iter(group.values())))}: {what} has {sorted(group)} but no weight / "
                         "weight_packed tensor")
    dt = r.dtype(wkey)
    if "weight_packed" in group or dt == "U8":
        return "nvfp4"
    if dt == "F8_E4M3":
        if "weight_scale_inv" in group:
            return "fp8-block"
        if "weight_scale" in group:
            return "fp8-channel"
        raise QuantError(f"{r.where(wkey)}: float8 weight without a weight_scale / weight_scale_inv tensor")
    if dt in FLOAT_DTYPES:
        extra = sorted(set(group) - {"weight", *ACTIVATION_SUFFIXES})
        if extra:
            raise QuantError(f"{r.where(wkey)}: {dt} weight with quantization scales {extra}")
        return "dense"
    raise QuantError(f"{r.where(wkey)}: unsupported dtype {dt}")


def _need(r: Reader, group: dict[str, str], suffix: str, wkey: str) -> str:
    if suffix not in group:
        raise QuantError(f"{r.where(wkey)}: the matching {suffix!r} tensor is missing")
    return group[suffix]


def _check(r: Reader, key: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    got, dt = r.shape(key), r.dtype(key)
    if got != tuple(shape):
        raise QuantError(f"{r.where(key)}: shape {list(got)}, expected {list(shape)}")
    if dt not in dtypes:
        raise QuantError(f"{r.where(key)}: dtype {dt}, expected {' or '.join(dtypes)}")


def _scalar(r: Reader, key: str) -> torch.Tensor:
    got = r.shape(key)
    if len(got) > 1 or (got and got[0] != 1):
        raise QuantError(f"{r.where(key)}: shape {list(got)}, expected a scalar ([] or [1])")
    if r.dtype(key) not in FLOAT_DTYPES:
        raise QuantError(f"{r.where(key)}: dtype {r.dtype(key)}, expected a float scalar (F32)")
    return r.get(key).reshape(()).float()


def read_parts(r: Reader, group: dict[str, str], kind: str, out: int, inn: int, fmt: QuantFormat | None,
               what: str) -> dict[str, torch.Tensor]:
    """Validate one linear layer's tensors against its logical shape [out, in] and read them (views of the file;
    the caller copies them once into their final place). Every returned tensor has the rows on axis 0."""
    if kind == "dense":
        _check(r, group["weight"], (out, inn), FLOAT_DTYPES)
        return {"weight": r.get(group["weight"])}
    if kind == "nvfp4":
        wkey = group.get("weight_packed", group.get("weight"))
        if inn % NVFP4_GROUP:
            raise QuantError(f"{r.where(wkey)}: NVFP4 needs in_features divisible by {NVFP4_GROUP}, got {inn}")
        _check(r, wkey, (out, inn // 2), ("U8",))
        skey = _need(r, group, "weight_scale", wkey)
        _check(r, skey, (out, inn // NVFP4_GROUP), ("F8_E4M3",))
        modelopt = fmt is None or fmt.producer == "modelopt"
        gname = "weight_scale_2" if modelopt else "weight_global_scale"
        wrong = "weight_global_scale" if modelopt else "weight_scale_2"
        if wrong in group and gname not in group:
            raise QuantError(f"{r.where(group[wrong])}: a {fmt.producer if fmt else 'modelopt'} NVFP4 checkpoint "
                             f"stores the global scale as {gname!r}, not {wrong!r}")
        gs = _scalar(r, _need(r, group, gname, wkey))
        return {"packed": r.get(wkey), "scale": r.get(skey), "global_scale": gs.expand(out)}
    if kind == "fp8-channel":
        wkey = group["weight"]
        _check(r, wkey, (out, inn), ("F8_E4M3",))
        skey = group["weight_scale"]
        sshape, sdt = r.shape(skey), r.dtype(skey)
        if sdt not in FLOAT_DTYPES:
            raise QuantError(f"{r.where(skey)}: dtype {sdt}, expected a float scale")
        if sshape in ((out, 1), (out,)):
            scale = r.get(skey).reshape(out, 1)
        elif sshape in ((), (1,), (1, 1)):  # per-tensor: one scale for every row
            scale = r.get(skey).reshape(1, 1).expand(out, 1)
        else:
            raise QuantError(f"{r.where(skey)}: shape {list(sshape)}, expected [{out}, 1] (one scale per row)")
        return {"weight": r.get(wkey), "scale": scale}
    if kind == "fp8-block":
        wkey = group["weight"]
        _check(r, wkey, (out, inn), ("F8_E4M3",))
        bo, bi = fmt.block if fmt is not None and fmt.block else (128, 128)
        skey = group["weight_scale_inv"]
        _check(r, skey, (-(-out // bo), -(-inn // bi)), FLOAT_DTYPES)
        return {"weight": r.get(wkey), "scale_inv": r.get(skey).float()}
    raise QuantError(f"{what}: unknown layout {kind!r}")


def check_kind(kind: str, fmt: QuantFormat | None, where: str) -> None:
    """Refuse a quantized tensor whose layout the checkpoint's config does not announce."""
    if kind == "dense":
        return
    if fmt is None:
        looks = {"nvfp4": "NVFP4 or dgemma int4 (packed codes)"}.get(kind, kind)
        raise QuantError(f"{where}: quantized tensors ({looks} layout by their names), but neither "
                         "hf_quant_config.json nor config.json's quantization_config describes a quantized checkpoint")
    if kind not in fmt.kind.split("+"):
        raise QuantError(f"{where}: {kind} tensors, but {fmt.source} announces {fmt.kind}")


def build(kind: str, fields: dict[str, torch.Tensor], shape: tuple[int, ...], fmt: QuantFormat | None,
          row_block: torch.Tensor | None = None) -> QTensor | torch.Tensor:
    """The QTensor (or dense tensor) of `kind` from its stacked fields."""
    if kind == "dense":
        return fields["weight"]
    if kind == "nvfp4":
        divides = fmt is not None and fmt.producer == "compressed-tensors"
        return NVFP4Tensor(fields["packed"], fields["scale"], fields["global_scale"], divides, shape=shape)
    if kind == "fp8-channel":
        return FP8ChannelTensor(fields["weight"], fields["scale"], shape=shape)
    if kind == "fp8-block":
        bi = fmt.block[1] if fmt is not None and fmt.block else 128
        return FP8BlockTensor(fields["weight"], fields["scale_inv"], row_block, bi, shape=shape)
    raise ValueError(kind)


def read_matrix(r: Reader, group: dict[str, str], out: int, inn: int, fmt: QuantFormat | None, what: str,
                dtype: torch.dtype, device: torch.device) -> QTensor | torch.Tensor:
    """One linear layer: a QTensor, or a dense tensor in `dtype` when the checkpoint stores it unquantized."""
    return read_stacked(r, [[group]], [out], inn, fmt, what, dtype, device, fused=False)


def read_stacked(r: Reader, groups: list[list[dict[str, str]]], rows: list[int], inn: int, fmt: QuantFormat | None,
                 what: str, dtype: torch.dtype, device: torch.device, fused: bool = True) -> QTensor | torch.Tensor:
    """groups[e][p]: expert e's piece p (gate, up) of rows[p] rows -> one [E, sum(rows), in] QTensor (or dense
    tensor); `fused=False` (one expert, one piece) gives a plain [out, in] linear layer. Every tensor is copied
    once, straight into its slice of the final packed tensor."""
    first = groups[0][0]
    first_key = first.get("weight_packed", first.get("weight", ""))
    kind = matrix_kind(r, first, what)
    check_kind(kind, fmt, r.where(first_key))
    block_rows = fmt.block[0] if fmt is not None and fmt.block else 128

    def n_rows(name: str, out: int) -> int:  # rows of a field for a piece of `out` weight rows
        return -(-out // block_rows) if name == "scale_inv" else out

    fields: dict[str, torch.Tensor] = {}
    for e, pieces in enumerate(groups):
        if len(pieces) != len(rows):
            raise QuantError(f"{what}: expert {e} has {len(pieces)} parts, expected {len(rows)}")
        for p, group in enumerate(pieces):
            wkey = group.get("weight_packed", group.get("weight", ""))
            got = matrix_kind(r, group, what)
            if got != kind:
                raise QuantError(f"{r.where(wkey)}: layout {got}, but {r.where(first_key)} is {kind} "
                                 "(the experts of one layer share one layout)")
            parts = read_parts(r, group, kind, rows[p], inn, fmt, what)
            for name, t in parts.items():
                if name not in fields:  # allocate each stacked field once, in its final dtype
                    total = sum(n_rows(name, o) for o in rows)
                    keep = dtype if kind == "dense" else t.dtype
                    fields[name] = torch.empty((len(groups), total, *t.shape[1:]), dtype=keep, device=device)
                off = sum(n_rows(name, o) for o in rows[:p])
                fields[name][e, off: off + t.shape[0]].copy_(t)
            del parts
    shape = (len(groups), sum(rows), inn) if fused else (rows[0], inn)
    if not fused:
        fields = {k: v[0] for k, v in fields.items()}
    row_block = None
    if kind == "fp8-block":
        starts = [sum(n_rows("scale_inv", o) for o in rows[:p]) for p in range(len(rows))]
        row_block = torch.cat([s + torch.arange(o) // block_rows for s, o in zip(starts, rows)]).to(device)
    return build(kind, fields, shape, fmt, row_block)
