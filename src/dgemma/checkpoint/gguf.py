"""GGUF files of the llama.cpp `diffusion-gemma` conversion: config, generation settings and tokenizer from the
metadata, weights kept in their GGUF blocks.

Quantized linear layers and experts stay as raw GGUF blocks (a GGUFTensor per matrix, or per layer for the experts)
and are dequantized one matrix / one expert at a time by the `gguf` package's own `gguf.quants.dequantize`; the tied
embedding and the small tensors (norms, scales) are dequantized once at load. Tensor bytes are read straight from
the file into their final buffers (no mapping of the whole file stays resident).

Tensor names (llama.cpp's conversion of DiffusionGemmaForBlockDiffusion): `token_embd`, `output_norm`, `rope_freqs`
(full layers' proportional RoPE: 1.0 for rotated pairs, 1e30 for unrotated ones), `self_cond_{pre_norm,gate,up,down}`,
and per layer `blk.N.` + `attn_norm`, `attn_{q,k,v,output}`, `attn_{q,k}_norm`, `post_attention_norm`, `ffn_norm`,
`post_ffw_norm`, `pre_ffw_norm_2`, `post_ffw_norm_1`, `post_ffw_norm_2`, `ffn_{gate,up,down}` (dense MLP),
`ffn_gate_inp` (router; `.scale` its input scale), `ffn_gate_up_exps` ([E, 2I, H], gate first; or separate
`ffn_gate_exps` / `ffn_up_exps`), `ffn_down_exps` (`.scale`: the per-expert scale), `layer_output_scale`,
`enc_layer_output_scale`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..config import ConfigError, GenerationConfig, ModelConfig
from ..errors import CheckpointError
from ..hardware import default_compute_dtype, resolve_device, resolve_dtype
from ..model import DiffusionGemma, Linear
from ..pipeline import Pipeline
from ..quant.modules import QExperts, QLinear
from ..quant.qtensor import QTensor, QuantError, register
from ..tokenizer import Tokenizer
from .assemble import Parts, assemble, set_module
from .formats import QuantFormat
from .keys import gguf_param

ARCH = "diffusion-gemma"
FLOAT_TYPES = ("F32", "F16", "BF16")

_EXPERT_TENSORS = ("ffn_gate_up_exps.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_IGNORED = ("rope_freqs.weight", "output.weight")  # rope_freqs feeds the config; the LM head is tied


@register("gguf-*")
@dataclass
class GGUFTensor(QTensor):
    """data uint8 [..., rows, bytes per row]: the file's blocks, untouched; qtype: a GGMLQuantizationType value.
    dequantize() runs gguf.quants.dequantize on the matrix (or expert) asked for."""

    data: torch.Tensor
    qtype: int = 0
    scheme: str = "gguf"
    shape: tuple[int, ...] = ()

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        return dequantize_blocks(self.data if index is None else self.data[index], self.qtype).to(dtype)


# -- block dequantizers in torch for the common types (the gguf package's numpy versions are the reference and the
# fallback; these give the same floats, several times faster, on any device) ----------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    """34 bytes: fp16 d, 32 int8 q; x = d * q."""
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    """22 bytes: fp16 d, 32 high bits (uint32), 16 bytes of nibbles (low: values 0-15, high: 16-31);
    x = d * (q - 16)."""
    n = b.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    high = ((b[:, 2:6, None] >> shifts) & 1).reshape(n, 32)  # bit j of the little-endian uint32
    nib = torch.cat([b[:, 6:] & 0xF, b[:, 6:] >> 4], dim=1)
    return _f16(b[:, :2]) * ((nib | high << 4).to(torch.int8) - 16).float()


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and mins (sub-blocks 0-3 in the low 6 bits of bytes 0-7, 4-7 split between
    bytes 8-11 and the top 2 bits of bytes 0-7)."""
    s = s.long()
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """144 bytes per 256 values: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles (each 32-byte
    chunk: low nibbles = sub-block 2j, high = 2j + 1); x = d * scale * q - dmin * min."""
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, 8, 32).float()
    d = (_f16(b[:, 0:2]) * sc)[:, :, None]
    dm = (_f16(b[:, 2:4]) * mn)[:, :, None]
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """210 bytes per 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16
    values), fp16 d last; each half of 128 values: positions 32k + l take nibble (k // 2) of ql[l + 32 (k % 2)] and
    bits 2k of qh[l]; x = d * scale * (q - 32)."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    ql = torch.cat([ql & 0xF, ql >> 4], dim=2).reshape(n, 2, 4, 32)  # (half, nibble*2 + part, l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[:, None]) & 3
    q = ((ql | qh << 4).to(torch.int8) - 32).float().reshape(n, 16, 16)
    d = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (d[:, :, None] * q).reshape(n, 256)


_TORCH_BLOCKS = {"Q8_0": (32, 34, _q8_0), "Q5_0": (32, 22, _q5_0), "Q4_K": (256, 144, _q4_k),
                 "Q6_K": (256, 210, _q6_k)}


def dequantize_blocks(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [..., rows, bytes per row] of GGUF blocks -> float32 [..., rows, values per row]."""
    name = gguf.GGMLQuantizationType(qtype).name
    if name in _TORCH_BLOCKS:
        block, size, fn = _TORCH_BLOCKS[name]
        values = raw.shape[-1] // size * block
        return fn(raw.reshape(-1, size)).reshape(*raw.shape[:-1], values)
    dense = gguf.quants.dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).to(raw.device)


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GGUFFile:
    """A parsed GGUF: metadata values and the tensor table."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, "TensorInfo"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(key, default)

    def need(self, key: str) -> Any:
        if key not in self.meta:
            raise QuantError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return self.meta[key]

    def count(self, key: str) -> int:
        """A metadata value that must be a positive integer (a layer count, a head size)."""
        v = self.need(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise QuantError(f"{self.path}: GGUF metadata key {key!r} must be a positive integer, got {v!r}")
        return v

    def type_name(self, name: str) -> str:
        return _type_name(self.path, name, self.tensors[name].tensor_type)


@dataclass
class TensorInfo:
    """One entry of a GGUF tensor table. shape: ggml order (innermost first); offset: absolute file offset."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    offset: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.tensor_type)]
        return self.n_elements // block * size


# GGUF value types: struct format of the scalar ones (8 = string, 9 = array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


MAX_ARRAY = 1 << 24  # entries of one metadata array: as Python values they cost ~30-60 bytes each


class _Header:
    """Sequential little-endian reads over the file's header bytes (a mapped file), every length checked against
    what is left before it is read."""

    def __init__(self, buf, path: Path, start: int = 0):
        self.buf, self.pos, self.path = buf, start, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise QuantError(f"{self.path}: GGUF header is truncated or corrupt (a length of {n} bytes at offset "
                             f"{self.pos} runs past the end of the file)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int):
        if vtype not in _SCALAR:
            raise QuantError(f"{self.path}: unknown GGUF value type {vtype} at offset {self.pos}")
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            v = self.scalar(vtype)
            return float(str(np.float32(v))) if vtype == 6 else v  # fp32: its shortest decimal
        if vtype == 8:
            return self.string()
        if vtype == 9:
            sub, count = self.scalar(4), self.scalar(10)
            if count > MAX_ARRAY:
                raise QuantError(f"{self.path}: a GGUF array of {count} entries at offset {self.pos} is over the "
                                 f"limit of {MAX_ARRAY} (the largest real ones, vocabularies and merges, are < 2^20)")
            if sub in _NUMPY:  # numeric arrays in one read
                arr = np.frombuffer(self.take(count * np.dtype(_NUMPY[sub]).itemsize), dtype=_NUMPY[sub])
                return arr.tolist()
            if sub not in (8, 9) or count * 8 > len(self.buf) - self.pos:  # each entry takes 8 bytes at least
                raise QuantError(f"{self.path}: GGUF array of {count} entries of type {sub} at offset {self.pos} "
                                 f"cannot fit in the file")
            return [self.value(sub) for _ in range(count)]
        raise QuantError(f"{self.path}: unknown GGUF value type {vtype}")


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensor table of a GGUF file (v2/v3), parsed directly: large vocabularies (262k tokens,
    500k merges) take about a second, where the general-purpose reader takes minutes."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise QuantError(f"{path}: not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise QuantError(f"{path}: GGUF version {version} is not supported (2, 3)")
        size = path.stat().st_size
        # Every key-value pair takes at least 13 bytes and every tensor entry 24: counts the file cannot hold are
        # refused before anything is read for them.
        if n_kv * 13 + n_tensors * 24 > size:
            raise QuantError(f"{path}: GGUF header claims {n_kv} metadata keys and {n_tensors} tensors, more than "
                             f"the file's {size} bytes can hold")
        # The header is parsed straight from the mapped file: one pass, no growing re-reads, and no read or
        # allocation larger than the file (`_Header.take` checks every length against it first).
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            h = _Header(mapped, path, start=24)
            meta = {}
            for _ in range(n_kv):
                key = h.string()
                meta[key] = h.value(h.scalar(4))
            infos = []
            for _ in range(n_tensors):
                name = h.string()
                n_dims = h.scalar(4)
                if n_dims > 8:
                    raise QuantError(f"{path}: tensor {name!r} claims {n_dims} dimensions")
                dims = tuple(h.scalar(10) for _ in range(n_dims))
                infos.append((name, dims, h.scalar(4), h.scalar(10)))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise QuantError(f"{path}: general.alignment must be a power of two (at most 2^20), got {align!r}")
    start = h.pos
    start += (-start) % align
    tensors = {}
    for name, dims, ttype, off in infos:
        _type_name(path, name, ttype)  # an unknown type is named with its tensor
        t = TensorInfo(name, dims, ttype, start + off)
        if t.offset + t.n_bytes > size:
            raise QuantError(f"{path}: tensor {name!r} lies past the end of the file (truncated download?)")
        tensors[name] = t
    return meta, tensors


def _type_name(path: Path, name: str, ttype: int) -> str:
    try:
        qtype = gguf.GGMLQuantizationType(int(ttype))
        gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise QuantError(f"{path}: tensor {name!r} has GGML type {ttype}, which this gguf package does not know") \
            from None
    return qtype.name


def open_gguf(path: Path) -> GGUFFile:
    try:
        meta, tensors = read_header(path)
    except (OSError, struct.error, UnicodeDecodeError, ValueError, KeyError) as e:
        if isinstance(e, QuantError):
            raise
        raise QuantError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return GGUFFile(path, meta, tensors)


def model_config(g: GGUFFile) -> dict[str, Any]:
    """config.json (HF layout, model_type diffusion_gemma) equivalent of the GGUF metadata, for ModelConfig."""
    arch = g.need("general.architecture")
    if arch != ARCH:
        raise QuantError(f"{g.path}: general.architecture is {arch!r}; dgemma runs {ARCH!r} GGUF files")
    a = ARCH + "."
    n_layers = g.count(a + "block_count")
    pattern = g.need(a + "attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n_layers:
        raise QuantError(f"{g.path}: {a}attention.sliding_window_pattern must list {n_layers} booleans")
    layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    kv = g.need(a + "attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * n_layers
    if len(kv) != n_layers or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in kv):
        raise QuantError(f"{g.path}: {a}attention.head_count_kv must be a positive integer or list {n_layers} of "
                         f"them")
    global_head_dim = g.count(a + "attention.key_length")
    head_dim = g.count(a + "attention.key_length_swa") if a + "attention.key_length_swa" in g.meta else global_head_dim
    ff = g.need(a + "feed_forward_length")
    ff = ff[0] if isinstance(ff, list) and ff else ff
    if not isinstance(ff, int) or isinstance(ff, bool) or ff <= 0:
        raise QuantError(f"{g.path}: GGUF metadata key {a + 'feed_forward_length'!r} must be a positive integer")
    sliding_kv = next((kv[i] for i, t in enumerate(layer_types) if t == "sliding_attention"), kv[0])
    full_theta = float(g.get(a + "rope.freq_base", 1_000_000.0))
    swa_theta = float(g.get(a + "rope.freq_base_swa", 10_000.0))
    swa_factor = int(g.get(a + "rope.dimension_count_swa", head_dim)) / head_dim
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise QuantError(f"{g.path}: tensor 'token_embd.weight' is missing")
    text = {
        "vocab_size": int(embd.shape[-1] if len(embd.shape) == 2 else 0) or None,
        "hidden_size": g.count(a + "embedding_length"),
        "intermediate_size": int(ff),
        "num_hidden_layers": n_layers,
        "num_attention_heads": g.count(a + "attention.head_count"),
        "num_key_value_heads": int(sliding_kv),
        "head_dim": head_dim,
        "num_experts": g.count(a + "expert_count"),
        "top_k_experts": g.count(a + "expert_used_count"),
        "moe_intermediate_size": g.count(a + "expert_feed_forward_length"),
        "sliding_window": g.count(a + "attention.sliding_window"),
        "layer_types": layer_types,
        "per_layer_config": {str(i): {"head_dim": global_head_dim, "num_key_value_heads": int(kv[i])}
                             for i, t in enumerate(layer_types) if t == "full_attention"},
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": swa_theta,
                                  "partial_rotary_factor": swa_factor},
            "full_attention": {"rope_type": "proportional", "rope_theta": full_theta,
                               "partial_rotary_factor": _full_rotary_factor(g, global_head_dim)},
        },
        "rms_norm_eps": float(g.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        "final_logit_softcapping": g.get(a + "final_logit_softcapping"),
        "max_position_embeddings": int(g.get(a + "context_length", 131072)),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", 0),
        "eos_token_id": eos_ids(g) or 1,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id", 2),
    }
    return {"model_type": "diffusion_gemma", "canvas_length": g.count("diffusion.canvas_length"),
            "text_config": text}


def _full_rotary_factor(g: GGUFFile, head_dim: int) -> float:
    """rope_freqs holds one factor per rotation pair of a full layer: 1 where it rotates, 1e30 where it does not."""
    t = g.tensors.get("rope_freqs.weight")
    if t is None:
        return 0.25  # the DiffusionGemma default
    if g.type_name("rope_freqs.weight") != "F32":
        raise QuantError(f"{g.path}: tensor 'rope_freqs.weight' must be F32")
    freqs = read_raw(g, "rope_freqs.weight").view(torch.float32).numpy().reshape(-1)
    if freqs.size != head_dim // 2:
        raise QuantError(f"{g.path}: tensor 'rope_freqs.weight' has {freqs.size} values, expected {head_dim // 2}")
    return 2 * int((freqs < 1e10).sum()) / head_dim


def eos_ids(g: GGUFFile) -> list[int]:
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = g.get(key)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    for v in g.get("tokenizer.ggml.eog_token_ids", []) or []:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def generation_settings(g: GGUFFile) -> dict[str, Any]:
    """generation_config.json fields from the `diffusion.eb_*` metadata (absent keys keep the defaults)."""
    names = {"diffusion.eb_max_steps": "max_denoising_steps", "diffusion.eb_t_min": "t_min",
             "diffusion.eb_t_max": "t_max", "diffusion.eb_entropy_bound": "entropy_bound",
             "diffusion.eb_stability_threshold": "stability_threshold",
             "diffusion.eb_confidence_threshold": "confidence_threshold"}
    out: dict[str, Any] = {field: g.meta[key] for key, field in names.items() if key in g.meta}
    if eos_ids(g):
        out["eos_token_id"] = eos_ids(g)
    if isinstance(g.get("tokenizer.ggml.padding_token_id"), int):
        out["pad_token_id"] = g.get("tokenizer.ggml.padding_token_id")
    return out


# ---------------------------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------------------------
def _byte_shape(g: GGUFFile, name: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(logical numpy shape, stored byte shape [..., rows, bytes per row], qtype) of a tensor."""
    t = g.tensors[name]
    qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
    logical = tuple(int(d) for d in reversed(t.shape))
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if logical[-1] % block:
        raise QuantError(f"{g.path}: tensor {name!r} ({qtype.name}) has rows of {logical[-1]} values, not a "
                         f"multiple of its block size {block}")
    return logical, (*logical[:-1], logical[-1] // block * type_size), int(qtype)


def read_raw(g: GGUFFile, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The stored bytes of a tensor as uint8 [..., rows, bytes per row], read from the file into `out` (or a new
    tensor): no whole-file mapping stays resident."""
    _, byte_shape, _ = _byte_shape(g, name)
    t = g.tensors[name]
    buf = out if out is not None else torch.empty(byte_shape, dtype=torch.uint8)
    if tuple(buf.shape) != byte_shape or not buf.is_contiguous():
        raise ValueError(f"read_raw {name}: buffer {list(buf.shape)} != {list(byte_shape)}")
    with open(g.path, "rb") as f:
        f.seek(t.offset)
        got = f.readinto(memoryview(buf.numpy()).cast("B"))
    if got != buf.numel():
        raise QuantError(f"{g.path}: tensor {name!r} is truncated ({got} of {buf.numel()} bytes)")
    return buf


def dequantize_rows(g: GGUFFile, name: str, dtype: torch.dtype, chunk_rows: int = 8192) -> torch.Tensor:
    """A whole tensor dequantized into `dtype`, chunk by chunk along its rows (bounded temporaries)."""
    logical, _, qtype = _byte_shape(g, name)
    raw = read_raw(g, name)
    flat = raw.reshape(-1, raw.shape[-1])
    out = torch.empty(flat.shape[0], logical[-1], dtype=dtype)
    for start in range(0, flat.shape[0], chunk_rows):
        out[start:start + chunk_rows] = dequantize_blocks(flat[start:start + chunk_rows], qtype)
    return out.view(logical)


def gguf_qtensor(g: GGUFFile, names: list[str], shape: tuple[int, ...]) -> GGUFTensor:
    """Raw blocks of one matrix, or of several stacked along the rows (separate gate and up experts)."""
    qtypes = set()
    parts = []
    for name in names:
        logical, byte_shape, qtype = _byte_shape(g, name)
        parts.append((name, logical, byte_shape))
        qtypes.add(qtype)
    if len(qtypes) != 1:
        raise QuantError(f"{g.path}: tensors {names} must share one quant type to be fused, got "
                         f"{[g.type_name(n) for n in names]}")
    rows = sum(p[1][-2] for p in parts)
    if (*parts[0][1][:-2], rows, parts[0][1][-1]) != tuple(shape):
        got = [list(p[1]) for p in parts]
        raise QuantError(f"{g.path}: tensor(s) {names} have shape {got}, expected {list(shape)} in total")
    qtype = qtypes.pop()
    if len(parts) == 1:
        data = read_raw(g, names[0])
    else:  # gate [E, I, b] then up [E, I, b] -> [E, 2I, b], read expert by expert into place
        data = torch.empty((*shape[:-1], parts[0][2][-1]), dtype=torch.uint8)
        off = 0
        for name, logical, byte_shape in parts:
            tmp = read_raw(g, name)
            data[..., off: off + logical[-2], :] = tmp
            off += logical[-2]
            del tmp
    name = gguf.GGMLQuantizationType(qtype).name
    return GGUFTensor(data, qtype, scheme=f"gguf-{name}", shape=tuple(shape))


def load_gguf(path: str | Path, dtype: str | torch.dtype | None = None,
              device: str | torch.device = "cpu") -> Pipeline:
    """A DiffusionGemma from a GGUF file: config, generation settings and tokenizer from its metadata."""
    path = Path(path)
    try:
        g = open_gguf(path)
        raw_cfg = model_config(g)
        cfg = ModelConfig.from_dict(raw_cfg, str(path))
        gen = GenerationConfig.from_dict(generation_settings(g), f"{path} (diffusion.* metadata)")
    except (QuantError, ConfigError) as e:
        raise CheckpointError(str(e)) from None
    target = resolve_dtype(dtype, "bfloat16")
    device = resolve_device(device)
    if dtype is None:
        target = default_compute_dtype(target, device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    try:
        unknown = [n for n in g.tensors if gguf_param(n) is None and n not in _IGNORED
                   and not any(n == f"blk.{i}.{e}" for i in range(cfg.num_hidden_layers) for e in _EXPERT_TENSORS)]
        if unknown:
            raise QuantError(f"{path}: {len(unknown)} tensor(s) of no DiffusionGemma weight: {', '.join(unknown[:8])}")
        for name in g.tensors:
            pname = gguf_param(name)
            if pname is None:
                continue
            if pname not in params:
                raise QuantError(f"{path}: tensor {name!r} ({pname}) does not exist in this config")
            want = params[pname]
            logical, _, _ = _byte_shape(g, name)
            if math.prod(logical) != math.prod(want) or (len(want) == 2 and logical != want):
                raise QuantError(f"{path}: tensor {name!r} has shape {list(logical)}, expected {list(want)}")
            qname = g.type_name(name)
            mod_name = pname[: -len(".weight")] if pname.endswith(".weight") else None
            if qname not in FLOAT_TYPES and mod_name in modules and isinstance(modules[mod_name], Linear):
                set_module(model, mod_name, QLinear(gguf_qtensor(g, [name], want).to(device)))
                continue
            state[pname] = dequantize_rows(g, name, target).reshape(want).to(device)
        for i in range(cfg.num_hidden_layers):
            e, i2, h = cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size
            fused = f"blk.{i}.ffn_gate_up_exps.weight"
            gate_up_names = [fused] if fused in g.tensors else [f"blk.{i}.ffn_gate_exps.weight",
                                                                 f"blk.{i}.ffn_up_exps.weight"]
            down_name = f"blk.{i}.ffn_down_exps.weight"
            for n in gate_up_names + [down_name]:
                if n not in g.tensors:
                    raise QuantError(f"{path}: tensor {n!r} is missing")
            types = {g.type_name(n) for n in gate_up_names + [down_name]}
            if types <= set(FLOAT_TYPES):
                gu = torch.cat([dequantize_rows(g, n, target) for n in gate_up_names], dim=-2)
                dn = dequantize_rows(g, down_name, target)
                for pname, t, want in ((f"layers.{i}.experts.gate_up_proj", gu, (e, i2, h)),
                                       (f"layers.{i}.experts.down_proj", dn, (e, h, i2 // 2))):
                    if tuple(t.shape) != want:
                        raise QuantError(f"{path}: layer {i} experts have shape {list(t.shape)}, expected {list(want)}")
                    state[pname] = t.to(device)
            else:
                model.layers[i].experts = QExperts(gguf_qtensor(g, gate_up_names, (e, i2, h)).to(device),
                                                   gguf_qtensor(g, [down_name], (e, h, i2 // 2)).to(device))
        tokenizer = tokenizer_from_gguf(g)
    except QuantError as e:
        raise CheckpointError(str(e)) from None
    fmt = QuantFormat("gguf", "gguf", str(path), raw={"file_type": g.get("general.file_type")})
    parts = Parts(path, gen, tokenizer, fmt)
    return assemble(model, state, parts, target, target, device, name_of=lambda n: f"{n} (dgemma name)")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # llama.cpp token types


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of a piece into two pieces of the vocabulary, the
    merge producing the higher-scored piece first (SentencePiece merges by piece score)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, piece in enumerate(tokens):
        if types[i] in (CONTROL, USER_DEFINED, BYTE) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], i, ids[left], ids[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def tokenizer_from_gguf(g: GGUFFile):
    """dgemma Tokenizer from `tokenizer.ggml.*` metadata (None when the file has no vocabulary). SentencePiece-style
    vocabularies (`llama`, `gemma4`: "▁" for spaces, <0xNN> byte fallback; merges stored or derived from the
    scores) and byte-level BPE (`gpt2`)."""
    tokens = g.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = g.get("tokenizer.ggml.model", "llama")
    n = len(tokens)
    types = g.get("tokenizer.ggml.token_type") or [1] * n
    scores = g.get("tokenizer.ggml.scores") or [0.0] * n
    if len(types) != n or len(scores) != n:
        raise QuantError(f"{g.path}: tokenizer.ggml.token_type / scores do not match the {n} tokens")
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges") or [] if " " in m]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = g.get("tokenizer.ggml.unknown_token_id")
    if kind in ("llama", "gemma4", "gemma"):
        if not merges:
            merges = sentencepiece_merges(tokens, scores, types)
        model = models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if isinstance(unk, int) else None,
                           byte_fallback=True, fuse_unk=True)
        tok = HFTokenizer(model)
        norm = [normalizers.Replace(" ", "▁")]
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if g.get("tokenizer.ggml.add_space_prefix", False):
            norm.insert(0, normalizers.Prepend("▁"))
            dec.append(decoders.Strip(" ", 1, 0))
        tok.normalizer = normalizers.Sequence(norm)
        tok.decoder = decoders.Sequence(dec)
    elif kind == "gpt2":
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise QuantError(f"{g.path}: tokenizer.ggml.model {kind!r} is not supported (llama, gemma4, gpt2)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def name(key: str) -> str | None:
        i = g.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < n else None

    config = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
              "pad_token": name("tokenizer.ggml.padding_token_id"),
              "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False))}
    return Tokenizer(tok, config, g.get("tokenizer.chat_template"))
