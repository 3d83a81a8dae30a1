"""Tiny random DiffusionGemma reference checkpoints, built with `transformers` (the test oracle).

dgemma itself never imports transformers; only the tests do. Every model here is small enough that building one
takes well under a second on a 2-core CPU, so each test module builds its own (module-scoped fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

# The vision tower is always created by the reference; keep it tiny.
VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4,
)

BASE_TEXT = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=6,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], num_experts=4,
    top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=2048,
)

DEFAULT_GEN = {"eos_token_id": [1, 5], "pad_token_id": 0}


def text_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """BASE_TEXT with overrides applied (a value of None is passed through: the reference then uses its default)."""
    tc = dict(BASE_TEXT)
    tc.update(overrides or {})
    return tc


def build(
    tmp_path: Path,
    name: str,
    text_overrides: dict[str, Any] | None = None,
    canvas_length: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    gen: dict[str, Any] | None = None,
) -> tuple[DiffusionGemmaForBlockDiffusion, Path]:
    """Build a random reference model, save it under tmp_path/name, return (reference model in eval mode, dir).

    All text weights are randomised, including norm weights, router scales and the (non-tied, differing) encoder and
    decoder layer scalars, so a parity test fails if dgemma ignores or mixes up any of them.
    `gen` sets generation_config.json fields; the special key `entropy_bound` becomes the reference's
    `sampler_config=EntropyBoundSamplerConfig(entropy_bound=...)`.
    """
    cfg = DiffusionGemmaConfig(text_config=text_config(text_overrides), vision_config=VISION,
                               canvas_length=canvas_length)
    torch.manual_seed(seed)
    m = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "vision" in n:
                continue
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for n, b in m.named_buffers():
            if "layer_scalar" in n:
                b.copy_(0.8 + 0.4 * torch.rand_like(b))
    settings = {**DEFAULT_GEN, **(gen or {})}
    for key, value in settings.items():
        if key == "entropy_bound":
            m.generation_config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=float(value))
        else:
            setattr(m.generation_config, key, value)
    if dtype != torch.float32:
        m.to(dtype)
    out = Path(tmp_path) / name
    m.save_pretrained(out)
    if dtype != torch.float32:
        # m.to() also cast the rotary inv_freq buffers to `dtype`, which no real user gets: reload the saved
        # checkpoint the ordinary way (from_pretrained keeps those buffers in fp32) and use that as the oracle.
        m = DiffusionGemmaForBlockDiffusion.from_pretrained(out, dtype=dtype).eval()
    return m, out


def edit_json(path: Path, fn) -> None:
    """Rewrite a JSON file in place: fn(dict) mutates it."""
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data, indent=2))


def ref_generate(m, prompt: torch.Tensor, max_new_tokens: int, seed: int, **overrides):
    """Run the reference sampler with dgemma-style overrides; return (ids per row without pad, tokens_per_forward
    per row as Python floats, the raw output)."""
    overrides = dict(overrides)
    if "entropy_bound" in overrides:
        overrides["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(overrides.pop("entropy_bound")))
    torch.manual_seed(seed)
    r = m.generate(prompt, max_new_tokens=max_new_tokens, **overrides)
    pad = m.generation_config.pad_token_id
    rows = []
    for b in range(prompt.shape[0]):
        new = r.sequences[b, prompt.shape[1]:]
        if pad is not None:
            new = new[new != pad]
        rows.append(new.tolist())
    return rows, [float(x) for x in r.tokens_per_forward.reshape(-1).tolist()], r
