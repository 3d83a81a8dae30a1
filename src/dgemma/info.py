"""`dgemma info`: what a checkpoint holds, read from its config and safetensors headers (weights are not loaded)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from .checkpoint import CheckpointError, map_key, weight_files
from .config import ConfigError, GenerationConfig, ModelConfig, read_json

# Bytes per parameter; NVFP4 adds one FP8 scale per 16 values.
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}


def describe(path: Path) -> dict:
    try:
        cfg = ModelConfig.from_file(path / "config.json")
        gen_file = path / "generation_config.json"
        gen = GenerationConfig.from_dict(read_json(gen_file), str(gen_file)) if gen_file.is_file() else None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(path)
    stored: dict[str, int] = {}
    text_params = vision_params = 0
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                stored[sl.get_dtype()] = stored.get(sl.get_dtype(), 0) + n
                if map_key(key)[0] == "vision":
                    vision_params += n
                else:
                    text_params += n
    layers = [
        {"index": i, "type": s.kind, "head_dim": s.head_dim, "kv_heads": s.num_kv_heads, "v_proj": s.has_v_proj,
         "rope": s.rope_type, "rope_theta": s.rope_theta, "partial_rotary_factor": s.partial_rotary_factor}
        for i, s in enumerate(cfg.layers)
    ]
    total = cfg.num_params
    return {
        "path": str(path),
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
                    "moe_intermediate_size": cfg.moe_intermediate_size, "dense_intermediate_size": cfg.intermediate_size},
        "sliding_window": cfg.sliding_window,
        "canvas_length": cfg.canvas_length,
        "max_position_embeddings": cfg.max_position_embeddings,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "layers": layers,
        "generation_config": gen.to_dict() if gen else None,
        "tokenizer": (path / "tokenizer.json").is_file(),
        "chat_template": _has_chat_template(path),
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
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{info['path']}[/bold]")
    ex = info["experts"]
    c.print(f"parameters {_human(info['parameters'])} (active per token {_human(info['active_parameters_per_token'])}), "
            f"hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['num_layers']} layers, "
            f"{info['attention_heads']} heads")
    c.print(f"MoE: {ex['num_experts']} experts, top-{ex['top_k']}, expert intermediate {ex['moe_intermediate_size']}, "
            f"dense intermediate {ex['dense_intermediate_size']}")
    c.print(f"canvas {info['canvas_length']}, sliding window {info['sliding_window']}, "
            f"max positions {info['max_position_embeddings']}, softcap {info['final_logit_softcapping']}")
    if info["stored_vision_parameters"]:
        c.print(f"vision weights: {_human(info['stored_vision_parameters'])} parameters (image input not supported yet)")
    c.print("bytes: " + ", ".join(f"{k} {_human(v)}B" for k, v in info["bytes"].items())
            + " | stored: " + ", ".join(f"{k} {_human(v)}" for k, v in info["stored_dtypes"].items()))
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
