"""`dgemma quantize IN OUT --scheme {int8,int4,fp8,nvfp4}` and `random-checkpoint --quantize`.

Streaming: tensors are read one at a time (fused experts one expert at a time, through safetensors slices, with the
file re-opened per tensor so mapped pages do not pile up), quantized, and appended to size-capped shards, so peak
memory is about one shard plus one tensor, not the model. Everything is written to a temporary sibling directory
that is renamed into place at the end: a failure never leaves a half-written checkpoint.

Layouts written:
- int8 / int4: dgemma's own (dgemma.quant.lowbit): every linear layer but the router, experts kept fused.
- fp8: compressed-tensors FP8 per channel (`float-quantized`), as llm-compressor writes it: every linear layer but
  the router and lm_head, experts split per expert (`...experts.{e}.{gate,up,down}_proj.weight` float8_e4m3fn +
  `weight_scale` [out, 1] in the checkpoint's dtype); `quantization_config` in config.json.
- nvfp4: ModelOpt NVFP4, experts only (`...experts.{e}.{gate,up,down}_proj.weight` uint8 [out, in/2] e2m1 pairs,
  `weight_scale` float8_e4m3fn [out, in/16], `weight_scale_2` float32 (shared by gate and up of one expert),
  `input_scale` float32), `hf_quant_config.json`. The input scales are not calibrated (1.0): dgemma computes
  weight-only; a W4A4 runtime would want calibrated ones.
The other tensors keep their dtype; the encoder's tied copies and lm_head are not written (the loader ties them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig, generation_config_dict, read_json
from ..hardware import resolve_dtype
from ..model import DiffusionGemma
from ..presets import config_dict
from ..quant import lowbit
from ..quant.qtensor import QuantError
from ..tokenizer import build_byte_tokenizer, save_tokenizer
from .keys import checkpoint_key
from .load import weight_files
from .lowbit import weight_keys
from .write import check_target, staged_dir

SCHEMES = ("int8", "int4", "fp8", "nvfp4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MAX = 6.0
E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between [0, .5, 1, 1.5, 2, 3, 4, 6]
NVFP4_GROUP = 16
SHARD_BYTES = 2 << 30

_DEC = "model.decoder."
_ENC = "model.encoder.language_model."


# -- encoders: one [rows, in] matrix -> the published fields --------------------------------------------------------
def encode_fp8(w: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors FP8 per channel: weight float8_e4m3fn [out, in], weight_scale [out, 1] (scale_dtype)."""
    w = w.float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / FP8_MAX).to(scale_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return {"weight": (w / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8), "weight_scale": scale}


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (bit 3 = sign) of each value of x (already divided by its scales)."""
    mag = torch.bucketize(x.abs(), E2M1_MIDPOINTS.to(x.device)).to(torch.uint8)
    return mag | ((x < 0) & (mag > 0)).to(torch.uint8) << 3


def encode_nvfp4(w: torch.Tensor, global_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ModelOpt NVFP4 of w [out, in]: weight uint8 [out, in/2], weight_scale fp8 [out, in/16], weight_scale_2
    float32 []. `global_amax` lets gate and up share one weight_scale_2."""
    w = w.float()
    out, inn = w.shape
    if inn % NVFP4_GROUP:
        raise QuantError(f"NVFP4 needs in_features divisible by {NVFP4_GROUP}, got {inn}")
    amax = w.abs().amax() if global_amax is None else global_amax.float()
    ws2 = (amax / (E2M1_MAX * FP8_MAX)).reshape(())
    ws2 = torch.where(ws2 > 0, ws2, torch.ones_like(ws2))
    g = w.view(out, inn // NVFP4_GROUP, NVFP4_GROUP)
    block = (g.abs().amax(dim=-1) / E2M1_MAX / ws2).clamp_(max=FP8_MAX).to(FP8)
    s = block.float() * ws2
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = e2m1_codes(g / s.unsqueeze(-1)).view(out, inn)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight": packed, "weight_scale": block, "weight_scale_2": ws2.float(),
            "input_scale": torch.tensor(1.0, dtype=torch.float32)}


# -- random fields for random-checkpoint --quantize (no dense intermediate) -----------------------------------------
class Pool:
    """Random bytes and N(0, 1) values drawn once, handed out as windows at random offsets: torch draws uint8 at
    ~10 MB/s on a small CPU, far too slow for 15 GB of codes, while copying windows runs at memory speed. The
    weights are still random (each window starts at its own seeded offset); they are just not independent."""

    def __init__(self, seed: int, size: int = 4 << 20):
        g = torch.Generator().manual_seed(seed)
        self.bytes = torch.randint(-(2**62), 2**62, (size,), dtype=torch.int64, generator=g).view(torch.uint8)
        self.normal = torch.empty(size).normal_(0.0, 1.0, generator=g)

    @staticmethod
    def _windows(pool: torch.Tensor, numel: int, g: torch.Generator) -> torch.Tensor:
        out = torch.empty(numel, dtype=pool.dtype)
        pos, half = 0, pool.numel() // 2
        while pos < numel:
            n = min(numel - pos, half)
            off = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            out[pos:pos + n] = pool[off:off + n]
            pos += n
        return out

    def uint8(self, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        return self._windows(self.bytes, math.prod(shape), g).view(shape)

    def randn(self, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        return self._windows(self.normal, math.prod(shape), g).view(shape)


def random_encoded(scheme: str, rows: int, inn: int, std: float, g: torch.Generator, group: int,
                   scale_dtype: torch.dtype, pool: Pool) -> dict[str, torch.Tensor]:
    """Random codes whose dequantized values have standard deviation ~std (uniform codes, one scale)."""
    if scheme == "int8":
        q = pool.uint8((rows, inn), g).view(torch.int8)
        q[q == -128] = -127
        return {"weight": q, "scale": torch.full((rows,), std / 73.6)}
    if scheme == "int4":  # uniform codes -8..7 have rms 4.64
        return {"packed": pool.uint8((rows, inn // 2), g),
                "scale": torch.full((rows, inn // group), std / 4.64, dtype=torch.bfloat16)}
    if scheme == "fp8":
        return {"weight": pool.randn((rows, inn), g).to(FP8),
                "weight_scale": torch.full((rows, 1), std, dtype=scale_dtype)}
    if scheme == "nvfp4":  # uniform e2m1 codes have rms 2.93
        return {"weight": pool.uint8((rows, inn // 2), g),
                "weight_scale": torch.ones(rows, inn // NVFP4_GROUP).to(FP8),
                "weight_scale_2": torch.tensor(std / 2.93), "input_scale": torch.tensor(1.0)}
    raise ValueError(scheme)


# -- sources ---------------------------------------------------------------------------------------------------------
class Source:
    """Where tensors come from: keys, shapes, dtype, and values (one expert at a time for fused experts)."""

    random = False

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str, index: int | None = None) -> torch.Tensor: ...


class CheckpointSource(Source):
    def __init__(self, path: Path):
        self.files = weight_files(path)
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        by_file: dict[Path, list[str]] = {}
        for k, f in self.files.items():
            by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in keys:
                    sl = h.get_slice(k)
                    self.meta[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), f, k))

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key][1]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        # A fresh handle per read: the pages of tensors already done are unmapped when it closes.
        with safe_open(str(self.files[key]), framework="pt") as h:
            t = h.get_tensor(key) if index is None else h.get_slice(key)[index]
            return t.clone()


def _st_dtype(name: str, file: Path, key: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if name not in table:
        raise QuantError(f"{file}: tensor {key!r} has dtype {name}; quantize reads plain fp32/bf16/fp16 checkpoints")
    return table[name]


class RandomSource(Source):
    """The random weights of `presets.random_state_dict`'s layout, drawn lazily per tensor (and per expert) from a
    seed derived from the key, so a full-size model is never held in memory."""

    random = True

    def __init__(self, cfg, seed: int, std: float, dtype: torch.dtype):
        with torch.device("meta"):
            model = DiffusionGemma(cfg)
        self.shapes = {checkpoint_key(n): tuple(p.shape) for n, p in model.named_parameters()}
        self.seed, self.std, self._dtype = seed, std, dtype
        self.pool = Pool(seed)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def generator(self, key: str, index: int | None = None) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()) + (index or 0) * 7919)

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        shape = self.shapes[key] if index is None else self.shapes[key][1:]
        if len(shape) == 1:
            return torch.ones(shape, dtype=self._dtype)
        return self.pool.randn(shape, self.generator(key, index)).mul_(self.std).to(self._dtype)


# -- the output ------------------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends tensors to size-capped safetensors shards; `finish` names them model-0000i-of-0000n and writes the
    index (or a single model.safetensors)."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.dir, self.cap = out_dir, shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.buffer and self.size + n > self.cap:
            self.flush()
        self.buffer[key] = t.contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.dir / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.dir / "shard-00000.tmp", self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


class Progress:
    """A progress bar over bytes of source weights (rich, on stderr; silent when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), disable=not enabled, transient=False)
        self.task = self.bar.add_task(label, total=total)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.bar.update(self.task, advance=n)


# -- planning --------------------------------------------------------------------------------------------------------
_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def role(key: str) -> str:
    """'drop' (a tied copy the loader restores), 'experts' (fused expert tensor), 'router', 'linear' (a linear
    layer's weight), or 'dense' (everything else, written as is)."""
    if key == "lm_head.weight":
        return "drop"
    if key.startswith(_ENC):
        return "dense" if key.endswith(".layer_scalar") else "drop"
    if not key.startswith(_DEC):
        return "dense"  # vision weights and anything else: kept unchanged
    rest = key[len(_DEC):]
    if rest.endswith(_EXPERTS):
        return "experts"
    if rest.endswith("router.proj.weight"):
        return "router"
    if rest.endswith(".weight") and any(
            p in rest for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_conditioning.gate_proj",
                                "self_conditioning.up_proj", "self_conditioning.down_proj")):
        return "linear"
    return "dense"


@dataclass
class Options:
    scheme: str
    group: int = lowbit.DEFAULT_GROUP
    shard_bytes: int = SHARD_BYTES
    progress: bool = True


def _int_fields(scheme: str, w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        q, s = lowbit.quantize_int8(w)
        return {"weight": q, "scale": s}
    p, s = lowbit.quantize_int4(w, group)
    return {"packed": p, "scale": s}


def emit(src: Source, key: str, opt: Options, put: Callable[[str, torch.Tensor], None]) -> None:
    """Write one source tensor in the target layout through `put(key, tensor)`."""
    kind = role(key)
    scheme = opt.scheme
    shape = src.shape(key)
    dt = src.dtype(key)
    if kind == "drop":
        return
    quantized = (kind == "experts") or (kind == "linear" and scheme != "nvfp4")
    if not quantized:
        put(key, src.get(key))
        return
    if kind == "linear":
        out, inn = shape
        if scheme in ("int8", "int4"):
            f = (random_encoded(scheme, out, inn, src.std, src.generator(key), opt.group, dt, src.pool) if src.random
                 else _int_fields(scheme, src.get(key), opt.group))
            codes, scale = weight_keys(scheme, key)
            put(codes, f["weight"] if scheme == "int8" else f["packed"])
            put(scale, f["scale"])
        else:  # fp8
            f = (random_encoded("fp8", out, inn, src.std, src.generator(key), opt.group, dt, src.pool) if src.random
                 else encode_fp8(src.get(key), dt))
            prefix = key[: -len(".weight")]
            put(prefix + ".weight", f["weight"])
            put(prefix + ".weight_scale", f["weight_scale"])
        return
    # fused experts [E, out, in]: one expert at a time
    n_exp, out, inn = shape
    layer_prefix = key[: -len(key.rsplit(".", 1)[1]) - 1]  # model.decoder.layers.N.experts
    proj = key.rsplit(".", 1)[1]  # gate_up_proj | down_proj
    if scheme in ("int8", "int4"):
        fields: dict[str, torch.Tensor] = {}
        for e in range(n_exp):
            f = (random_encoded(scheme, out, inn, src.std, src.generator(key, e), opt.group, dt, src.pool) if src.random
                 else _int_fields(scheme, src.get(key, e), opt.group))
            for name, t in f.items():
                if name not in fields:
                    fields[name] = torch.empty((n_exp, *t.shape), dtype=t.dtype)
                fields[name][e] = t
        codes, scale = weight_keys(scheme, key)
        put(codes, fields["weight"] if scheme == "int8" else fields["packed"])
        put(scale, fields["scale"])
        return
    for e in range(n_exp):
        pieces = [("gate_proj", 0, out // 2), ("up_proj", out // 2, out)] if proj == "gate_up_proj" \
            else [("down_proj", 0, out)]
        if src.random:
            per = {name: random_encoded(scheme, b - a, inn, src.std, src.generator(f"{key}.{name}", e), opt.group, dt,
                                         src.pool)
                   for name, a, b in pieces}
        else:
            w = src.get(key, e).float()
            shared = w.abs().amax() if scheme == "nvfp4" else None  # gate and up share weight_scale_2
            per = {name: (encode_nvfp4(w[a:b], shared) if scheme == "nvfp4" else encode_fp8(w[a:b], dt))
                   for name, a, b in pieces}
        for name, f in per.items():
            for suffix, t in f.items():
                put(f"{layer_prefix}.{e}.{name}.{suffix}", t)


# -- configs ---------------------------------------------------------------------------------------------------------
def quant_files(scheme: str, config: dict[str, Any], keys: list[str],
                group: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The config.json to write and any extra JSON files, for `scheme`."""
    config = json.loads(json.dumps(config))
    config.pop("quantization_config", None)
    n_layers = config.get("text_config", config).get("num_hidden_layers", 0)
    routers = [f"{_DEC}layers.{i}.router.proj" for i in range(n_layers)]
    if scheme in ("int8", "int4"):
        qc: dict[str, Any] = {"quant_method": "dgemma", "scheme": scheme, "version": 1, "ignore": routers}
        if scheme == "int4":
            qc["group_size"] = group
        config["quantization_config"] = qc
        return config, {}
    if scheme == "fp8":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "float-quantized",
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False, "group_size": None, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True, "observer": None},
            }},
            "ignore": ["lm_head", *routers], "kv_cache_scheme": None,
        }
        return config, {}
    hf_quant = {"producer": {"name": "modelopt", "version": "dgemma-quantize"},
                "quantization": {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP, "kv_cache_quant_algo": None,
                                 "exclude_modules": ["lm_head", "model.decoder.layers.*.self_attn*",
                                                     "model.decoder.layers.*.mlp*", "model.decoder.layers.*.router*",
                                                     "model.decoder.self_conditioning*", "model.encoder*"]}}
    return config, {"hf_quant_config.json": json.dumps(hf_quant, indent=2) + "\n"}


# -- drivers ---------------------------------------------------------------------------------------------------------
def check_options(scheme: str, group: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "int4" and group not in lowbit.GROUPS:
        raise ValueError(f"--group-size must be one of {', '.join(map(str, lowbit.GROUPS))} for int4, got {group}")


def check_shapes(src: Source, opt: Options) -> None:
    """Refuse before writing anything when a shape does not fit the scheme."""
    for key in src.keys():
        kind = role(key)
        if kind not in ("linear", "experts") or (kind == "linear" and opt.scheme == "nvfp4"):
            continue
        inn = src.shape(key)[-1]
        if opt.scheme == "int4" and inn % opt.group:
            raise ValueError(f"tensor {key!r}: in_features {inn} is not a multiple of --group-size {opt.group}")
        if opt.scheme == "nvfp4" and inn % NVFP4_GROUP:
            raise ValueError(f"tensor {key!r}: in_features {inn} is not a multiple of {NVFP4_GROUP} (NVFP4 blocks)")


def write(out: Path, src: Source, config: dict[str, Any], opt: Options, copy_from: Path | None = None,
          overwrite: bool = False, extra: dict[str, str] | None = None) -> Path:
    """Stream every tensor of `src` into a new checkpoint at `out` (atomic: `presets.staged_dir`)."""
    check_options(opt.scheme, opt.group)
    check_shapes(src, opt)
    with staged_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, opt.shard_bytes)
        keys = src.keys()
        total = sum(math.prod(src.shape(k)) for k in keys)
        with Progress(total, f"quantize {opt.scheme}", opt.progress) as bar:
            for key in keys:
                emit(src, key, opt, writer.add)
                bar.advance(math.prod(src.shape(key)))
        writer.finish()
        cfg, files = quant_files(opt.scheme, config, keys, opt.group)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for name, text in {**files, **(extra or {})}.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if copy_from is not None:  # generation config, tokenizer, task files: everything but weights and config
            for f in copy_from.iterdir():
                skip = f.name.startswith("model") or f.name in ("config.json", "hf_quant_config.json")
                if f.is_file() and not skip:
                    shutil.copy2(f, tmp / f.name)
    return Path(out)


def quantize_checkpoint(src_dir: str | Path, out: str | Path, scheme: str, group: int = lowbit.DEFAULT_GROUP,
                        overwrite: bool = False, progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize a plain (fp32/bf16/fp16) checkpoint directory into `out`."""
    src_dir = Path(src_dir)
    check_options(scheme, group)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: not a directory")
    if Path(out).resolve() == src_dir.resolve():
        raise ValueError(f"{out}: the output must differ from the input checkpoint")
    config = read_json(src_dir / "config.json")
    if config.get("quantization_config") is not None or (src_dir / "hf_quant_config.json").exists():
        raise ValueError(f"{src_dir}: already quantized; quantize reads plain fp32/bf16/fp16 checkpoints")
    src = CheckpointSource(src_dir)
    return write(Path(out), src, config, Options(scheme, group, shard_bytes, progress), copy_from=src_dir,
                 overwrite=overwrite)


def random_quantized_checkpoint(out: str | Path, preset: str, scheme: str, seed: int = 0, dtype: str = "float32",
                                std: float = 0.02, group: int = lowbit.DEFAULT_GROUP, overwrite: bool = False,
                                progress: bool = True, shard_bytes: int = SHARD_BYTES, config: dict | None = None,
                                **overrides: Any) -> Path:
    """A random checkpoint written directly in `scheme`'s layout (quantized weights drawn as random codes), with
    the byte-level tokenizer; no dense copy of the model is ever built. `config`: a config.json to use as it is
    (e.g. one the reference saved) instead of the preset's."""
    check_options(scheme, group)
    check_target(Path(out), overwrite)
    tok = build_byte_tokenizer()
    cfg_dict = config if config is not None else config_dict(preset, dtype=dtype, **overrides)
    cfg = ModelConfig.from_dict(cfg_dict)
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size must be >= {tok.vocab_size} to hold the byte-level tokenizer")
    src = RandomSource(cfg, seed, std, resolve_dtype(dtype))
    with tempfile.TemporaryDirectory() as tdir:
        save_tokenizer(tok, Path(tdir))
        (Path(tdir) / "generation_config.json").write_text(json.dumps(generation_config_dict(), indent=2) + "\n")
        extra = {f.name: f.read_text(encoding="utf-8") for f in Path(tdir).iterdir()}
    return write(Path(out), src, cfg_dict, Options(scheme, group, shard_bytes, progress), overwrite=overwrite,
                 extra=extra)
