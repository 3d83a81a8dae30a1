"""Named model shapes and random weights: random checkpoints in the save_pretrained layout (loadable by dgemma and
by the reference implementation alike), and the same random models built directly in memory."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint.keys import checkpoint_key
from .hardware import resolve_dtype
from .model import DiffusionGemma
from .pipeline import Pipeline
from .config import (DEFAULT_GLOBAL_HEAD_DIM, DEFAULT_ROPE, FULL, SLIDING, GenerationConfig, ModelConfig,
                     default_layer_types, generation_config_dict, padded_keys)

# text_config fields per preset; `canvas_length` is a top-level field.
PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred K parameters: instant on any CPU, for trying things out and for tests.
    "tiny": dict(
        vocab_size=262, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, num_experts=4,
        top_k_experts=2, moe_intermediate_size=32, sliding_window=64, max_position_embeddings=8192,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL], canvas_length=32,
    ),
    # The benchmark's CPU-sized MoE (about 89M parameters).
    "small-moe": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2, num_experts=16,
        top_k_experts=4, moe_intermediate_size=256, sliding_window=512, max_position_embeddings=32768,
        canvas_length=256,
    ),
    # The real google/diffusiongemma-26B-A4B-it shapes.
    "26b-a4b": dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
        top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144,
        canvas_length=256,
    ),
}

# A minimal vision block so the reference builds a tiny tower instead of its 16-layer default.
TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4,
)


def config_dict(preset: str | dict[str, Any], dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """A config.json in the reference's save_pretrained layout."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        spec = dict(PRESETS[preset])
    else:
        spec = dict(preset)
    spec.update(overrides)
    canvas = spec.pop("canvas_length", 256)
    layer_types = list(spec.pop("layer_types", None) or default_layer_types(spec["num_hidden_layers"]))
    layer_types[-1] = FULL
    global_override = {"head_dim": spec.pop("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)}
    kv = spec.pop("num_global_key_value_heads", None)
    if kv is not None:
        global_override["num_key_value_heads"] = kv
    text = {
        "model_type": "diffusion_gemma_text", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": None,
        "initializer_range": 0.02,
        "rope_parameters": copy.deepcopy(DEFAULT_ROPE),
        **spec,
        "layer_types": layer_types,
        "per_layer_config": padded_keys({i: dict(global_override) for i, t in enumerate(layer_types) if t == FULL}),
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": canvas, "dtype": dtype, "tie_word_embeddings": True, "initializer_range": 0.02,
        "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880,
        "text_config": text, "vision_config": dict(TINY_VISION),
    }


def preset_config(preset: str | dict[str, Any], dtype: str = "float32", **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset (or of a dict of text_config fields), with overrides."""
    return ModelConfig.from_dict(config_dict(preset, dtype=dtype, **overrides), f"preset {preset!r}")


def _random_parameters(cfg: ModelConfig, seed: int, std: float, dtype: torch.dtype,
                       device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(dgemma parameter name, random value) in parameter order: matrices N(0, std) drawn in fp32 from one
    generator seeded with `seed` and then cast, every 1-D weight (norms, scales, layer scalars) 1. Only one fp32
    temporary exists at a time, so a model that fits in `dtype` can be built."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in DiffusionGemma(cfg).named_parameters()]
    for name, shape in shapes:
        if len(shape) == 1:
            yield name, torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
            if dtype != torch.float32:
                t = t.to(dtype)  # drops the fp32 draw before the next one
            yield name, t


def random_state_dict(cfg: ModelConfig, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random weights under their save_pretrained names (see `_random_parameters`)."""
    return {checkpoint_key(n): t for n, t in _random_parameters(cfg, seed, std, dtype, device)}


def random_model(preset: str | dict[str, Any] = "tiny", dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02, **overrides: Any) -> Pipeline:
    """A model (Pipeline) with random weights, built directly in memory on `device` (no checkpoint on disk).

    The weights are those of `random_state_dict`: on CPU this is exactly the model that
    `load_model(write_random_checkpoint(dir, preset, seed=seed, std=std), dtype=dtype)` returns."""
    dtype, device = resolve_dtype(dtype), torch.device(device)
    cfg = preset_config(preset, str(dtype).removeprefix("torch."), **overrides)
    _check_fits(cfg, dtype, device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    model.load_state_dict(dict(_random_parameters(cfg, seed, std, dtype, device)), assign=True, strict=True)
    model.requires_grad_(False)
    model.eval()
    return Pipeline(model, GenerationConfig.from_dict(generation_config_dict()),
                    source=f"random:{preset if isinstance(preset, str) else 'custom'}")


def _check_fits(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    """A clear MemoryError instead of the OOM killer (26b-a4b in fp32 on a laptop)."""
    need = cfg.num_params * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    else:
        try:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        except OSError:
            m = None
        free, where = (int(m.group(1)) * 1024 if m else 0), "available host memory"
    if free and need > 0.9 * free:
        raise MemoryError(f"{cfg.num_params / 1e9:.2f} G parameters need {need / 2**30:.1f} GiB in "
                          f"{str(dtype).removeprefix('torch.')}, more than the {free / 2**30:.1f} GiB of {where}")
