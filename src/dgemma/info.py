"""`dgemma info`: what a checkpoint holds, read from its config and safetensors headers, or from a GGUF file's
metadata and tensor table (weights are not loaded): shapes, the quantized format, bytes and bits per weight of
each part of the model."""

from __future__ import annotations

import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .checkpoint import gguf as G
from .checkpoint.keys import map_key
from .checkpoint.load import detect_quant, find_gguf, read_header, weight_files
from .config import ConfigError, GenerationConfig, ModelConfig, read_json
from .errors import CheckpointError
from .images import ImageProcessorConfig
from .quant.qtensor import QuantError
from .vision import VisionConfig

# Bytes per parameter; NVFP4 adds one FP8 scale per 16 values.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}
# Bytes per element of each safetensors dtype.
ELEMENT_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I16": 2,
                 "I32": 4, "I64": 8, "BOOL": 1}
PARTS = ("experts", "attention", "dense MLP", "router", "embedding", "self-conditioning", "norms and scalars",
         "vision")
# Tensors that only carry scales: bytes, but no weights of their own.
_SCALE_SUFFIXES = ("_scale", "_scale_2", "_scale_inv", "_global_scale", "input_scale")


def part_of(key: str) -> str:
    """The part of the model a checkpoint key (safetensors or GGUF name) belongs to."""
    if "vision" in key:
        return "vision"
    if "exps" in key or ".experts." in key:
        return "experts"
    if "self_attn" in key or ".attn_" in key:
        return "attention"
    if ".mlp." in key or re.search(r"\.ffn_(gate|up|down)\.", key):
        return "dense MLP"
    if "router" in key or "ffn_gate_inp" in key:
        return "router"
    if "embed_tokens" in key or "lm_head" in key or "token_embd" in key:
        return "embedding"
    if "self_conditioning" in key or "self_cond" in key:
        return "self-conditioning"
    return "norms and scalars"


def _weights_in(key: str, dtype: str, n: int) -> int:
    """Logical weights a stored tensor holds: two per byte of packed 4-bit codes, none for a quantization scale."""
    if key.endswith(_SCALE_SUFFIXES) and not key.endswith("per_expert_scale"):
        return 0
    return 2 * n if dtype == "U8" else n


def _add(parts: dict, part: str, weights: int, nbytes: int) -> None:
    p = parts.setdefault(part, {"weights": 0, "bytes": 0})
    p["weights"] += weights
    p["bytes"] += nbytes


def _finish(parts: dict) -> dict:
    out = {}
    for name in PARTS:
        if name in parts:
            p = parts[name]
            out[name] = {**p, "bits_per_weight": round(8 * p["bytes"] / p["weights"], 3) if p["weights"] else None}
    return out


def describe(path: Path) -> dict:
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return describe_gguf(gguf_file)
    try:
        cfg = ModelConfig.from_file(path / "config.json")
        gen_file = path / "generation_config.json"
        gen = GenerationConfig.from_dict(read_json(gen_file), str(gen_file)) if gen_file.is_file() else None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    fmt = detect_quant(path)
    files = weight_files(path)
    stored: dict[str, int] = {}
    parts: dict[str, dict[str, int]] = {}
    text_params = vision_params = 0
    for file in sorted(set(files.values())):
        for key, entry in read_header(file)[1].items():  # headers only: nothing is mapped or read
            if key == "__metadata__":
                continue
            n = math.prod(entry["shape"])
            dt = entry["dtype"]
            stored[dt] = stored.get(dt, 0) + n
            _add(parts, part_of(key), _weights_in(key, dt, n), n * ELEMENT_BYTES.get(dt, 1))
            if map_key(key)[0] == "vision":
                vision_params += n
            else:
                text_params += n
    info = _summary(path, cfg, gen, fmt.label if fmt else None, parts, stored, text_params, vision_params,
                    (path / "tokenizer.json").is_file(), _has_chat_template(path))
    info["vision"] = _vision(path, vision_params)
    return info


def _vision(path: Path, params: int) -> dict | None:
    """The vision tower's shape and the image budget, when config.json has one and its weights are stored."""
    raw = read_json(path / "config.json").get("vision_config")
    if not isinstance(raw, dict) or not params:
        return None
    try:
        vc = VisionConfig.from_dict(raw)
        proc = ImageProcessorConfig.from_dir(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {"layers": vc.num_hidden_layers, "hidden_size": vc.hidden_size, "heads": vc.num_attention_heads,
            "head_dim": vc.head_dim, "intermediate_size": vc.intermediate_size, "patch_size": vc.patch_size,
            "pooling_kernel_size": vc.pooling_kernel_size, "standardize": vc.standardize, "parameters": params,
            "max_soft_tokens": proc.max_soft_tokens, "patches_per_image": proc.max_patches}


def describe_gguf(path: Path) -> dict:
    """The same summary for a GGUF file, from its metadata and tensor table."""
    try:
        g = G.open_gguf(path)
        cfg = ModelConfig.from_dict(G.model_config(g), str(path))
        gen = GenerationConfig.from_dict(G.generation_settings(g), f"{path} (diffusion.* metadata)")
    except (QuantError, ConfigError) as e:
        raise CheckpointError(str(e)) from None
    parts: dict[str, dict[str, int]] = {}
    stored: dict[str, int] = {}
    n_params = 0
    for name, t in g.tensors.items():
        qname = g.type_name(name)
        stored[qname] = stored.get(qname, 0) + int(t.n_elements)
        if name != "rope_freqs.weight":
            _add(parts, part_of(name), int(t.n_elements), int(t.n_bytes))
            n_params += int(t.n_elements)
    types = ", ".join(f"{k} {v / max(1, n_params):.0%}" for k, v in sorted(stored.items(), key=lambda kv: -kv[1]))
    file_type = g.get("general.file_type")
    label = f"GGUF ({types})" + (f", file type {file_type}" if file_type is not None else "")
    info = _summary(path, cfg, gen, label, parts, stored, n_params, 0, bool(g.get("tokenizer.ggml.tokens")),
                    isinstance(g.get("tokenizer.chat_template"), str))
    info["vision"] = None  # a GGUF holds the text model (a vision tower would be a separate mmproj file)
    return info


def _summary(path: Path, cfg: ModelConfig, gen, quant: str | None, parts: dict, stored: dict, text_params: int,
             vision_params: int, tokenizer: bool, chat_template: bool) -> dict:
    layers = [
        {"index": i, "type": s.kind, "head_dim": s.head_dim, "kv_heads": s.num_kv_heads, "v_proj": s.has_v_proj,
         "rope": s.rope_type, "rope_theta": s.rope_theta, "partial_rotary_factor": s.partial_rotary_factor}
        for i, s in enumerate(cfg.layers)
    ]
    total = cfg.num_params
    return {
        "path": str(path),
        "format": quant or "unquantized",
        "parts": _finish(parts),
        "stored_bytes": sum(p["bytes"] for p in parts.values()),
        "parameters": total,
        "active_parameters_per_token": cfg.active_params,
        "stored_text_parameters": text_params,
        "stored_vision_parameters": vision_params,
        "stored_dtypes": stored,
        "bytes": {k: int(total * v) for k, v in BYTES_PER_PARAM.items()},
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_hidden_layers,
        "attention_heads": cfg.num_attention_heads,
        "experts": {"num_experts": cfg.num_experts, "top_k": cfg.top_k_experts,
                    "moe_intermediate_size": cfg.moe_intermediate_size,
                    "dense_intermediate_size": cfg.intermediate_size},
        "sliding_window": cfg.sliding_window,
        "canvas_length": cfg.canvas_length,
        "max_position_embeddings": cfg.max_position_embeddings,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "layers": layers,
        "generation_config": gen.to_dict() if gen else None,
        "tokenizer": tokenizer,
        "chat_template": chat_template,
    }


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    cfg = path / "tokenizer_config.json"
    try:
        return cfg.is_file() and isinstance(read_json(cfg).get("chat_template"), str)
    except ConfigError:
        return False


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def render(info: dict) -> None:
    c = Console()
    c.print(f"[bold]{info['path']}[/bold]")
    ex = info["experts"]
    c.print(f"parameters {_human(info['parameters'])} "
            f"(active per token {_human(info['active_parameters_per_token'])}), "
            f"hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['num_layers']} layers, "
            f"{info['attention_heads']} heads")
    c.print(f"MoE: {ex['num_experts']} experts, top-{ex['top_k']}, expert intermediate {ex['moe_intermediate_size']}, "
            f"dense intermediate {ex['dense_intermediate_size']}")
    c.print(f"canvas {info['canvas_length']}, sliding window {info['sliding_window']}, "
            f"max positions {info['max_position_embeddings']}, softcap {info['final_logit_softcapping']}")
    v = info.get("vision")
    if v:
        c.print(f"vision tower: {v['layers']} layers, width {v['hidden_size']}, {v['heads']} heads x {v['head_dim']}, "
                f"MLP {v['intermediate_size']}, patch {v['patch_size']}, {v['pooling_kernel_size']}x"
                f"{v['pooling_kernel_size']} pooling{', standardised' if v['standardize'] else ''}; "
                f"{_human(v['parameters'])} parameters; up to {v['max_soft_tokens']} soft tokens per image "
                f"({v['patches_per_image']} patches)")
    c.print("bytes: " + ", ".join(f"{k} {_human(v)}B" for k, v in info["bytes"].items())
            + " | stored: " + ", ".join(f"{k} {_human(v)}" for k, v in info["stored_dtypes"].items()))
    c.print(f"format: {info['format']}, {_human(info['stored_bytes'])}B stored")
    pt = Table(title="stored, by part")
    for col in ("part", "weights", "bytes", "bits/weight"):
        pt.add_column(col, justify="left" if col == "part" else "right")
    for name, p in info["parts"].items():
        bpw = "-" if p["bits_per_weight"] is None else f"{p['bits_per_weight']:.2f}"
        pt.add_row(name, _human(p["weights"]), f"{_human(p['bytes'])}B", bpw)
    c.print(pt)
    t = Table(title="layers")
    for col in ("#", "type", "head_dim", "kv heads", "v_proj", "rope"):
        t.add_column(col)
    for layer in info["layers"]:
        rope = f"{layer['rope']} θ={layer['rope_theta']:g}"
        if layer["partial_rotary_factor"] != 1.0:
            rope += f" ×{layer['partial_rotary_factor']:g}"
        t.add_row(str(layer["index"]), layer["type"].replace("_attention", ""), str(layer["head_dim"]),
                  str(layer["kv_heads"]), "yes" if layer["v_proj"] else "K=V", rope)
    c.print(t)
    if info["generation_config"]:
        c.print("generation defaults: " + ", ".join(f"{k}={v}" for k, v in info["generation_config"].items()
                                                     if v is not None))
    c.print(f"tokenizer: {'yes' if info['tokenizer'] else 'no (raw ids)'}")
