"""Load a DiffusionGemma checkpoint from a local directory in Hugging Face layout.

Layouts: one `model.safetensors`, or shards listed by `model.safetensors.index.json`. Keys follow save_pretrained
(decoder stack under `model.decoder.*`, encoder extras under `model.encoder.language_model.*`); encoder copies of the
tied text weights and `lm_head.weight` may be present or absent. Vision weights are skipped (text use only).
Only safetensors is read: nothing is ever unpickled.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ConfigError, GenerationConfig, ModelConfig, read_json
from .model import DiffusionGemma

log = logging.getLogger("dgemma")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

_DEC = "model.decoder."
_ENC = "model.encoder.language_model."
_VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_SC = {"pre_norm.weight": "sc_pre_norm.weight", "gate_proj.weight": "sc_mlp.gate_proj.weight",
       "up_proj.weight": "sc_mlp.up_proj.weight", "down_proj.weight": "sc_mlp.down_proj.weight"}


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message names the file and tensor at fault."""


def resolve_dtype(dtype: str | torch.dtype | None, fallback: str | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    name = dtype if dtype is not None else (fallback or "float32")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available in this torch build/machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def map_key(key: str) -> tuple[str, str | None]:
    """Checkpoint key -> (kind, dgemma parameter name). kind: 'main', 'tied' (duplicate of a main weight), 'vision',
    or 'unknown'."""
    if key.startswith(_VISION):
        return "vision", None
    if key == "lm_head.weight":
        return "tied", "embed_tokens.weight"
    for prefix, kind in ((_DEC, "main"), (_ENC, "tied")):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith("self_conditioning.") and kind == "main":
            name = _SC.get(rest[len("self_conditioning."):])
            return ("main", name) if name else ("unknown", None)
        m = re.fullmatch(r"layers\.(\d+)\.layer_scalar", rest)
        if m and kind == "tied":  # the encoder's layer scalar is its own weight, not a tied copy
            return "main", f"layers.{m.group(1)}.encoder_layer_scalar"
        return kind, rest
    return "unknown", None


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
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> DiffusionGemma:
    """Load config, weights, generation defaults and tokenizer from a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    try:
        cfg = ModelConfig.from_file(path / "config.json")
        gen_file = path / "generation_config.json"
        gen = GenerationConfig.from_dict(read_json(gen_file), str(gen_file)) if gen_file.is_file() else GenerationConfig()
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    target_dtype = resolve_dtype(dtype, cfg.torch_dtype if cfg.torch_dtype in DTYPES else None)
    device = resolve_device(device)

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}

    files = weight_files(path)
    # Choose the source of every parameter: the decoder key wins, an encoder/lm_head copy fills in when absent.
    sources: dict[str, tuple[str, Path]] = {}
    tied: list[tuple[str, str, Path]] = []
    unexpected, vision = [], 0
    for key, file in files.items():
        kind, name = map_key(key)
        if kind == "vision":
            vision += 1
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
    missing = [n for n in expected if n not in sources and not n.endswith("encoder_layer_scalar")]
    if missing:
        shown = ", ".join(_ckpt_name(n) for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")

    handles: dict[Path, object] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        for name, shape in expected.items():
            if name not in sources:  # encoder layer scalar absent: the reference starts it at 1
                state[name] = torch.ones(shape, dtype=target_dtype, device=device)
                continue
            key, file = sources[name]
            state[name] = _read(handles, file, key, shape, target_dtype, device)
        for name, key, file in tied:  # tied copies must at least have the right shape
            got = _shape(handles, file, key)
            if got != expected[name]:
                raise CheckpointError(f"{file}: tensor {key!r} has shape {list(got)}, expected {list(expected[name])}")
    finally:
        handles.clear()
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False)
    model.eval()
    model.generation_config = gen
    model.source = str(path)
    if vision:
        log.warning("%s: checkpoint has vision weights (%d tensors); they are skipped because image input is not "
                    "supported yet. Loaded for text use.", path, vision)
    if (path / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_dir(path)
    return model


def _handle(handles: dict, file: Path):
    if file not in handles:
        try:
            handles[file] = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as e:
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
    try:
        t = _handle(handles, file).get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from None
    if not t.is_floating_point():
        raise CheckpointError(f"{file}: tensor {key!r} has non-float dtype {t.dtype}")
    # Always a private copy: safetensors hands out views of the mapped file at arbitrary (unaligned) offsets,
    # and some CPUs' GEMM kernels round differently on unaligned weights, which breaks bitwise parity.
    return t.to(device=device, dtype=dtype, copy=True)


def _ckpt_name(name: str) -> str:
    """dgemma parameter name -> its save_pretrained key (for error messages)."""
    sc = {ours: theirs for theirs, ours in _SC.items()}
    if name in sc:
        return _DEC + "self_conditioning." + sc[name]
    return _DEC + name
