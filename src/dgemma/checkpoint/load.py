"""Load a DiffusionGemma checkpoint from a local directory in Hugging Face layout.

Layouts: one `model.safetensors`, or shards listed by `model.safetensors.index.json`. Keys follow save_pretrained
(decoder stack under `model.decoder.*`, encoder extras under `model.encoder.language_model.*`); encoder copies of the
tied text weights and `lm_head.weight` may be present or absent. The vision tower (`model.encoder.vision_tower.*`,
`model.encoder.embed_vision.*`) becomes `model.vision` when the checkpoint holds it (`vision=False` skips it).
Only safetensors is read: nothing is ever unpickled.

Quantized checkpoints (detected from `hf_quant_config.json` or config.json's `quantization_config`, see
dgemma.checkpoint.formats) keep their quantized linear layers and experts packed: those modules become QLinear /
QExperts over QTensors; per-expert keys (`...experts.{e}.gate_proj.weight` etc.) are stacked into one
[E, 2I, H] / [E, H, I] QTensor per layer. A GGUF file (or a directory holding one) is read by dgemma.checkpoint.gguf.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError, GenerationConfig, ModelConfig, read_json
from ..errors import CheckpointError
from ..hardware import DTYPES, default_compute_dtype, resolve_device, resolve_dtype
from ..images import ImageProcessorConfig
from ..tokenizer import Tokenizer
from .assemble import Parts, assemble, set_module
from .gguf import load_gguf
from .keys import DECODER, ENCODER, checkpoint_key, map_key
from .lowbit import load_into, parse_config
from ..model import DiffusionGemma, Linear
from ..pipeline import Pipeline
from .formats import (FLOAT_DTYPES, FP8BlockTensor, QuantFormat, Reader, check_kind, detect, read_matrix,
                            read_stacked, split_key)
from ..quant.modules import QExperts, QLinear
from ..quant.qtensor import QTensor, QuantError
from ..vision import CHECKPOINT_PREFIX as VISION_PREFIX
from ..vision import VisionConfig, VisionEncoder

log = logging.getLogger("dgemma")

_DEC, _ENC = DECODER, ENCODER


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The text stack's tensors a checkpoint of `cfg` holds (save_pretrained key -> shape), besides the tied copies
    (encoder text weights, lm_head) and the vision tower. Built on the meta device: no memory for any size."""
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    return {checkpoint_key(name): tuple(p.shape) for name, p in model.named_parameters()}


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = read_json(index)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is missing or empty")
        files = {}
        for key, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {fname!r} (for tensor {key!r}) but {f} does not exist")
            files[key] = f
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {key: single for key in _keys(single)}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only pickle-based weights found (*.bin/*.pt); dgemma loads safetensors only, "
                              "never pickle. Convert the checkpoint to safetensors first.")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _keys(file: Path) -> list[str]:
    return [k for k in read_header(file)[1] if k != "__metadata__"]


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               vision: bool = True) -> Pipeline:
    """Load config, weights, generation defaults, tokenizer and (unless `vision=False`) the vision tower from a
    checkpoint directory (or a GGUF file)."""
    path = Path(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_gguf(gguf_file, dtype=dtype, device=device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    try:
        fmt = detect_quant(path)
        cfg = ModelConfig.from_file(path / "config.json")
        gen_file = path / "generation_config.json"
        gen = (GenerationConfig.from_dict(read_json(gen_file), str(gen_file)) if gen_file.is_file()
               else GenerationConfig())
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    target_dtype = resolve_dtype(dtype, cfg.torch_dtype if cfg.torch_dtype in DTYPES else None)
    device = resolve_device(device)
    # No bf16 cliff: 16-bit weights compute in fp32 on CPUs without native bf16. A quantized checkpoint's dense
    # 16-bit linear layers stay 16-bit in memory (expanded per matmul), so the model still fits where it was meant to.
    compute_dtype = default_compute_dtype(target_dtype, device) if dtype is None else target_dtype
    if fmt is None:
        target_dtype = compute_dtype

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    files = weight_files(path)
    try:
        files, quantized = load_quantized(model, files, fmt, target_dtype, device)
    except QuantError as e:
        raise CheckpointError(str(e)) from None
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if name not in quantized}
    # Choose the source of every parameter: the decoder key wins, an encoder/lm_head copy fills in when absent.
    sources: dict[str, tuple[str, Path]] = {}
    tied: list[tuple[str, str, Path]] = []
    unexpected, vision_files = [], {}
    for key, file in files.items():
        kind, name = map_key(key)
        if kind == "vision":
            vision_files[key] = file
        elif kind == "tied" and _tied_to_quantized(key, quantized):
            continue
        elif kind == "unknown" or name not in expected:
            unexpected.append(key)
        elif kind == "main":
            sources[name] = (key, file)
        else:
            tied.append((name, key, file))
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) for this config: {shown}")
    for name, key, file in tied:
        sources.setdefault(name, (key, file))

    handles: dict[Path, object] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        # File by file, each closed before the next: pages already copied out do not stay mapped (and counted).
        for name in sorted(sources, key=lambda n: str(sources[n][1])):
            key, file = sources[name]
            if file not in handles:
                handles.clear()
            state[name] = _read(handles, file, key, expected[name], target_dtype, device)
        for name, key, file in tied:  # tied copies must at least have the right shape
            got = _shape(handles, file, key)
            if got != expected[name]:
                raise CheckpointError(f"{file}: tensor {key!r} has shape {list(got)}, expected {list(expected[name])}")
    finally:
        handles.clear()
    parts = Parts(path, gen, quant_format=fmt, replaced=quantized)
    if vision and vision_files:
        parts.vision = _load_vision(path, cfg, vision_files, compute_dtype, device)
        try:
            processor = ImageProcessorConfig.from_dir(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if processor.patch_size != parts.vision.cfg.patch_size:  # no processor file: follow the tower
            processor = replace(processor, patch_size=parts.vision.cfg.patch_size,
                                pooling_kernel_size=parts.vision.cfg.pooling_kernel_size)
        parts.image_processor = processor
    if (path / "tokenizer.json").is_file():
        parts.tokenizer = Tokenizer.from_dir(path)
    return assemble(model, state, parts, target_dtype, compute_dtype, device)


def _load_vision(path: Path, cfg: ModelConfig, files: dict[str, Path], dtype: torch.dtype,
                 device: torch.device) -> VisionEncoder:
    """The vision tower + projector from the checkpoint's vision tensors; every tensor must be there with its shape."""
    if cfg.vision_config is None:
        raise CheckpointError(f"{path}: {len(files)} vision tensors but config.json has no vision_config")
    try:
        vcfg = VisionConfig.from_dict(cfg.vision_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: vision_config: {e}") from None
    with torch.device("meta"):
        enc = VisionEncoder(vcfg, cfg.hidden_size)
    want = {VISION_PREFIX + k: (k, tuple(t.shape)) for k, t in enc.state_dict().items()}
    missing = sorted(set(want) - set(files))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: vision tensor(s) missing from the checkpoint: {shown} (load with "
                              "vision=False for text use)")
    extra = sorted(set(files) - set(want))
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise CheckpointError(f"{path}: unexpected vision tensor(s) for this vision_config: {shown}")
    handles: dict[Path, object] = {}
    try:
        state = {name: _read(handles, files[key], key, shape, dtype, device) for key, (name, shape) in want.items()}
    finally:
        handles.clear()
    enc.load_state_dict(state, assign=True, strict=True)
    return enc.requires_grad_(False).eval()


def _handle(handles: dict, file: Path):
    if file not in handles:
        try:
            handles[file] = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, RuntimeError) as e:  # RuntimeError: the file cannot be mapped
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return handles[file]


def _shape(handles: dict, file: Path, key: str) -> tuple[int, ...]:
    f = _handle(handles, file)
    try:
        return tuple(f.get_slice(key).get_shape())
    except SafetensorError as e:
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from None


def _read(handles, file: Path, key: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    got = _shape(handles, file, key)
    if got != shape:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(got)}, expected {list(shape)}")
    stored = _handle(handles, file).get_slice(key).get_dtype()
    if stored not in _FLOAT_DTYPES:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {stored}, not a float16/bfloat16/float32 weight "
                              "(a quantized tensor without its scales, or a layout dgemma does not read)")
    # Always a private copy: safetensors hands out views of the mapped file at arbitrary (unaligned) offsets,
    # and some CPUs' GEMM kernels round differently on unaligned weights, which breaks bitwise parity. Read with
    # plain file reads, not through the mapping: copying out of a mapping keeps its pages resident (and counted)
    # until the file is closed, twice the tensor's size at the peak (3 GB for the 26B model's token table).
    t = _read_unmapped(file, key)
    return t if t.dtype == dtype and device.type == "cpu" else t.to(device=device, dtype=dtype)


_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


MAX_HEADER_BYTES = 100 << 20  # a safetensors header (JSON) larger than this is refused unread


def read_header(file: Path) -> tuple[int, dict]:
    """(offset of the data, tensor table) of a safetensors file, read without mapping it: the header's length is
    bounded by the file and MAX_HEADER_BYTES, and every tensor's byte range must lie inside the file. Parsed once
    per file version (the loader asks for every tensor it reads)."""
    try:
        st = file.stat()
    except OSError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return _parsed_header(str(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _parsed_header(name: str, size: int, mtime_ns: int) -> tuple[int, dict]:
    file = Path(name)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: not a safetensors file (its header claims {n} bytes)")
            table = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{file}: not a safetensors file (the header is not an object)")
    for key, entry in table.items():
        if key == "__metadata__":
            continue
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)
        offsets = entry.get("data_offsets") if ok else None
        if not (ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size - 8 - n):
            raise CheckpointError(f"{file}: tensor {key!r} has a malformed entry or lies past the end of the file")
    return 8 + n, table


def _read_unmapped(file: Path, key: str) -> torch.Tensor:
    """A float tensor read into freshly allocated (aligned) memory with file reads."""
    start, table = read_header(file)
    info = table[key]
    begin, end = info["data_offsets"]
    out = torch.empty(info["shape"], dtype=_FLOAT_DTYPES[info["dtype"]])
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    if end - begin != len(view):
        raise CheckpointError(f"{file}: tensor {key!r} holds {end - begin} bytes, expected {len(view)}")
    with open(file, "rb") as f:
        f.seek(start + begin)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{file}: tensor {key!r} is truncated")
            done += got
    return out


# ---------------------------------------------------------------------------------------------------------------
# quantized checkpoints
# ---------------------------------------------------------------------------------------------------------------
_EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"layers\.(\d+)\.experts\.(gate_up_proj|down_proj)$")
_FUSED_SCALE = re.compile(r"layers\.(\d+)\.experts\.(gate_up_proj|down_proj)_scale_inv$")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file to load: `path` itself, or the only *.gguf in a directory without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path}: several GGUF files ({', '.join(f.name for f in found)}); pass one")
        return found[0] if found else None
    return None


def detect_quant(path: Path) -> QuantFormat | None:
    """The checkpoint's quantized layout (None for a plain one); CheckpointError when it is unreadable/unknown."""
    cfg_file = path / "config.json"
    try:
        raw = read_json(cfg_file) if cfg_file.is_file() else {}
        return detect(path, raw)
    except QuantError as e:
        raise CheckpointError(str(e)) from None


def load_quantized(model: DiffusionGemma, files: dict[str, Path], fmt: QuantFormat | None, dtype: torch.dtype,
                   device: torch.device) -> tuple[dict[str, Path], set[str]]:
    """Read every quantized linear layer and every per-expert / fused-FP8 expert tensor of `files` into QTensors,
    swap QLinear / QExperts into `model` (or fill its dense expert weights when per-expert keys are unquantized).
    Returns the keys left for the dense loader and the dgemma names of the parameters replaced."""
    if fmt is not None and fmt.producer == "dgemma":  # dgemma's own int8 / int4 layout
        return load_into(model, files, parse_config(fmt.raw, fmt.source), device)
    reader = Reader(files)
    linear: dict[str, dict[str, str]] = {}  # checkpoint module prefix -> {suffix: key}
    experts: dict[int, dict[int, dict[str, dict[str, str]]]] = {}  # layer -> expert -> proj -> {suffix: key}
    fused_scale: dict[tuple[int, str], str] = {}
    fused_layers: set[int] = set()
    consumed: set[str] = set()
    for key in files:
        if not key.startswith(_DEC):
            continue
        rest = key[len(_DEC):]
        m = _FUSED_SCALE.fullmatch(rest)
        if m:
            fused_scale[(int(m.group(1)), m.group(2))] = key
            continue
        m = _FUSED.fullmatch(rest)
        if m and reader.dtype(key) not in FLOAT_DTYPES:  # quantized fused experts: their scales must be there
            fused_layers.add(int(m.group(1)))
            continue
        split = split_key(key)
        if split is None:
            continue
        prefix, suffix = split
        m = _EXPERT.fullmatch(prefix[len(_DEC):])
        if m:
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            experts.setdefault(layer, {}).setdefault(e, {}).setdefault(proj, {})[suffix] = key
            consumed.add(key)
        elif suffix != "weight" or reader.dtype(key) not in FLOAT_DTYPES:
            linear.setdefault(prefix, {})
    for key in files:  # the whole group of every quantized linear layer (its weight included)
        split = split_key(key) if key.startswith(_DEC) else None
        if split and split[0] in linear:
            linear[split[0]][split[1]] = key
            consumed.add(key)

    replaced: set[str] = set()
    modules = dict(model.named_modules())
    for prefix, group in sorted(linear.items()):
        kind, name = map_key(prefix + ".weight")
        mod_name = name[: -len(".weight")] if name else None
        if kind != "main" or mod_name not in modules or not isinstance(modules[mod_name], Linear):
            raise QuantError(f"{reader.where(next(iter(group.values())))}: quantized tensor of no linear layer of "
                             "this model")
        out, inn = modules[mod_name].weight.shape
        q = read_matrix(reader, group, out, inn, fmt, prefix, dtype, device)
        set_module(model, mod_name, QLinear(q) if isinstance(q, QTensor) else _dense_linear(q))
        replaced.add(name)
        reader.release()

    cfg = model.config
    for layer in sorted(set(experts) | {k[0] for k in fused_scale} | fused_layers):
        if layer >= cfg.num_hidden_layers:
            raise QuantError(f"{next(iter(files.values())).parent}: tensors {_DEC}layers.{layer}.experts.* for a "
                             f"layer that does not exist (the config has {cfg.num_hidden_layers} layers)")
        e_, i_, h_ = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        if layer in experts:
            per = experts[layer]
            for e in range(e_):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    if proj not in per.get(e, {}):
                        raise QuantError(f"{files[next(iter(files))].parent}: expert {e} {proj} of layer {layer} is "
                                         f"missing (no {_DEC}layers.{layer}.experts.{e}.{proj}.* tensors)")
            extra = sorted(set(per) - set(range(e_)))
            if extra:
                key = next(iter(per[extra[0]]["gate_proj"].values())) if "gate_proj" in per[extra[0]] else ""
                raise QuantError(f"{reader.where(key)}: expert {extra[0]} of layer {layer} does not exist (the "
                                 f"config has {e_} experts)")
            gate_up = read_stacked(reader, [[per[e]["gate_proj"], per[e]["up_proj"]] for e in range(e_)],
                                   [i_, i_], h_, fmt, "experts", dtype, device)
            down = read_stacked(reader, [[per[e]["down_proj"]] for e in range(e_)], [h_], i_, fmt, "experts",
                                dtype, device)
        else:
            gate_up = _fused_fp8(reader, files, layer, "gate_up_proj", (e_, 2 * i_, h_), fused_scale, fmt, consumed,
                                 device)
            down = _fused_fp8(reader, files, layer, "down_proj", (e_, h_, i_), fused_scale, fmt, consumed, device)
        if isinstance(gate_up, QTensor) != isinstance(down, QTensor):
            raise QuantError(f"layer {layer}: experts gate_up and down must both be quantized or both dense")
        block = model.layers[layer]
        if isinstance(gate_up, QTensor):
            block.experts = QExperts(gate_up, down)
        else:
            block.experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
            block.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        replaced.update({f"layers.{layer}.experts.gate_up_proj", f"layers.{layer}.experts.down_proj"})
        reader.release()
    reader.release()
    return {k: f for k, f in files.items() if k not in consumed}, replaced


def _tied_to_quantized(key: str, quantized: set[str]) -> bool:
    """An encoder copy of a weight that the decoder stores quantized (or as per-expert tensors)."""
    rest = key[len(_ENC):] if key.startswith(_ENC) else ""
    m = re.match(r"layers\.(\d+)\.experts\.", rest)
    if m:
        return f"layers.{m.group(1)}.experts.gate_up_proj" in quantized
    split = split_key(key)
    return split is not None and map_key(split[0] + ".weight")[1] in quantized


def _fused_fp8(reader: Reader, files: dict[str, Path], layer: int, proj: str, shape: tuple[int, int, int],
               fused_scale: dict, fmt: QuantFormat | None, consumed: set[str], device: torch.device) -> QTensor:
    """A fused [E, out, in] FP8 expert tensor with its `{proj}_scale_inv` block scales (HF fine-grained FP8)."""
    key = f"{_DEC}layers.{layer}.experts.{proj}"
    skey = fused_scale.get((layer, proj))
    if key not in files:
        raise QuantError(f"{reader.where(skey)}: block scales without the tensor {key!r}")
    if skey is None:
        raise QuantError(f"{reader.where(key)}: the matching {proj}_scale_inv tensor is missing")
    check_kind("fp8-block", fmt, reader.where(key))
    bo, bi = fmt.block if fmt is not None and fmt.block else (128, 128)
    e_, out, inn = shape
    for k, want, dts in ((key, shape, ("F8_E4M3",)), (skey, (e_, -(-out // bo), -(-inn // bi)), FLOAT_DTYPES)):
        if reader.shape(k) != want:
            raise QuantError(f"{reader.where(k)}: shape {list(reader.shape(k))}, expected {list(want)}")
        if reader.dtype(k) not in dts:
            raise QuantError(f"{reader.where(k)}: dtype {reader.dtype(k)}, expected {dts[0]}")
    weight = reader.get(key).to(device, copy=True)
    scale_inv = reader.get(skey).to(device, dtype=torch.float32, copy=True)
    consumed.update({key, skey})
    return FP8BlockTensor(weight, scale_inv, (torch.arange(out) // bo).to(device), bi, shape=shape)


def _dense_linear(weight: torch.Tensor) -> Linear:
    with torch.device("meta"):
        lin = Linear(weight.shape[1], weight.shape[0])
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    return lin
