"""DiffusionGemma's vision tower (Gemma 4 vision encoder), its 3x3 pooler and the projector into the text width.

Data path for a batch of preprocessed images (see images.py), padded patches marked by position (-1, -1):
  patch embedding   Linear(3*p*p -> d) on 2*(pixels - 0.5), plus table[0][x] + table[1][y] (zero on padding)
  encoder layers    bidirectional self-attention (padding keys masked), q/k RMSNorm with weight, v RMSNorm without,
                    scaling 1.0, 2-D axial RoPE (first half of each head by x, second by y), gated GELU-tanh MLP,
                    sandwich norms (4 per layer); no final norm
  pooler            zero the padding, average each k x k block of patches by position, * sqrt(d) in fp32,
                    drop empty slots, optionally (h - std_bias) * std_scale
  projector         RMSNorm without weight, Linear(d -> text hidden), no sqrt(hidden) scaling

Module names mirror the checkpoint: `VisionEncoder().state_dict()` keys are the checkpoint keys with the prefix
`model.encoder.` removed (`vision_tower.*`, `embed_vision.embedding_projection.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_PREFIX = "model.encoder."


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 72
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    standardize: bool = False
    use_clipped_linears: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_activation: only gelu_pytorch_tanh is supported, "
                             f"got {self.hidden_activation!r}")
        if self.head_dim % 4:
            raise ValueError(f"vision_config.head_dim must be a multiple of 4 (2-D RoPE), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("vision_config.num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
        """From the checkpoint's `vision_config` (config.json); unknown keys are ignored."""
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config.rope_parameters.rope_type must be 'axial', got {rope.get('rope_type')!r}")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "rope_theta"}
        if "head_dim" not in d or d["head_dim"] is None:
            fields["head_dim"] = int(d.get("hidden_size", cls.hidden_size)) // int(
                d.get("num_attention_heads", cls.num_attention_heads))
        if "rope_theta" in rope:
            fields["rope_theta"] = float(rope["rope_theta"])
        return cls(**fields)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # fp32 statistics, weight used as is (Gemma 4 convention: no 1 + w), cast back to the input dtype.
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ClippableLinear(nn.Module):
    """Linear without bias; with `use_clipped_linears` its input and output are clamped to stored ranges."""

    def __init__(self, cfg: VisionConfig, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        self.clipped = cfg.use_clipped_linears
        if self.clipped:
            for name, value in (("input_min", -math.inf), ("input_max", math.inf),
                                ("output_min", -math.inf), ("output_max", math.inf)):
                self.register_buffer(name, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        if self.clipped:
            x = torch.clamp(x, self.output_min, self.output_max)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        # Factorised 2-D table: row 0 indexed by x (column), row 1 by y (row).
        self.position_embedding_table = nn.Parameter(torch.zeros(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        pos = positions.clamp(min=0)
        table = self.position_embedding_table
        pe = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        return h + pe.masked_fill(padding.unsqueeze(-1), 0.0)


def axial_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, P, head_dim] for (x, y) positions: channels laid out x, x, y, y (each a quarter of the head),
    i.e. a standard rotate-half RoPE on the first half by x and on the second half by y."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter)))
    angles = positions.float()[..., None] * inv_freq  # [n, P, 2, quarter]
    ax, ay = angles[..., 0, :], angles[..., 1, :]
    full = torch.cat([ax, ax, ay, ay], dim=-1)
    return full.cos(), full.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, P, heads, head_dim]; each half of the head is rotated on its own (rotate-half within the half)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    parts = []
    for s in (slice(0, half), slice(half, 2 * half)):
        xs = x[..., s]
        parts.append(xs * cos[..., s] + _rotate_half(xs) * sin[..., s])
    return torch.cat(parts, dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = ClippableLinear(cfg, d, self.n_heads * self.head_dim)
        self.k_proj = ClippableLinear(cfg, d, self.n_kv * self.head_dim)
        self.v_proj = ClippableLinear(cfg, d, self.n_kv * self.head_dim)
        self.o_proj = ClippableLinear(cfg, self.n_heads * self.head_dim, d)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_eps = cfg.rms_norm_eps  # v norm has no weight

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        n, P, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(n, P, self.n_heads, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(n, P, self.n_kv, self.head_dim)), cos, sin)
        v = rms_norm(self.v_proj(x).view(n, P, self.n_kv, self.head_dim), None, self.v_eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # Bidirectional; padding keys masked for every query. Scaling 1.0 (the q/k norms set the scale).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :], scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(n, P, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = ClippableLinear(cfg, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_ok))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """Patches -> pooled, scaled (and optionally standardised) features [total soft tokens, d]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = Encoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        cfg = self.cfg
        n, P, _ = pixel_values.shape
        k2 = cfg.pooling_kernel_size ** 2
        if P % k2:
            raise ValueError(f"pixel_values: {P} patches per image is not a multiple of {k2} (pooling "
                             f"{cfg.pooling_kernel_size}x{cfg.pooling_kernel_size})")
        padding = (position_ids == -1).all(dim=-1)
        h = self.patch_embedder(pixel_values, position_ids, padding)
        cos, sin = axial_rope(position_ids, cfg.head_dim, cfg.rope_theta)
        key_ok = ~padding
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, key_ok)
        pooled, filled = self._pool(h, position_ids, padding, P // k2)
        # Scaling by sqrt(d) can leave the fp16 range: kept in fp32 until after the standardisation.
        pooled = pooled * (cfg.hidden_size ** 0.5)
        counts = filled.sum(dim=1).tolist()
        feats = pooled[filled]
        if cfg.standardize:
            feats = (feats - self.std_bias.float()) * self.std_scale.float()
        return feats.to(h.dtype), counts

    def _pool(self, h: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Average k x k blocks by position: slot = x // k + (W // k) * (y // k), W = the image's width in patches.
        Returns fp32 [n, length, d] and which slots received a patch."""
        k = self.cfg.pooling_kernel_size
        n, P, d = h.shape
        pos = positions.clamp(min=0)
        width = pos[..., 0].amax(dim=-1, keepdim=True) + 1
        slot = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)
        if P == length:  # k == 1: no pooling
            return h.float().masked_fill(padding.unsqueeze(-1), 0.0), torch.ones_like(padding)
        if int(slot.max()) >= length:
            raise ValueError(f"image_position_ids: a patch falls into pooled slot {int(slot.max())} "
                             f"but an image has only {length} slots")
        hf = h.float().masked_fill(padding.unsqueeze(-1), 0.0) / (k * k)
        out = torch.zeros(n, length, d, dtype=torch.float32, device=h.device)
        out.scatter_add_(1, slot.unsqueeze(-1).expand(n, P, d), hf)
        # Padding patches land in slot 0 with zero features, as in the reference (slot 0 is always filled).
        filled = torch.zeros(n, length, dtype=torch.bool, device=h.device)
        filled.scatter_(1, slot, True)
        return out, filled


class MultimodalEmbedder(nn.Module):
    """Projector into the text width: RMSNorm without weight, then Linear without bias."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.embedding_projection = nn.Linear(cfg.hidden_size, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_norm(x, None, self.eps))


class VisionEncoder(nn.Module):
    """Tower + projector: `forward(pixel_values, image_position_ids)` -> (soft tokens [total, text hidden],
    soft tokens per image). The soft tokens of all images are concatenated in order, ready to replace the prompt's
    image placeholder ids in order."""

    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = MultimodalEmbedder(cfg, text_hidden_size)

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != 3 * self.cfg.patch_size ** 2:
            raise ValueError(f"pixel_values: expected [images, patches, {3 * self.cfg.patch_size ** 2}], "
                             f"got {list(pixel_values.shape)}")
        if image_position_ids.shape != (*pixel_values.shape[:2], 2):
            raise ValueError(f"image_position_ids: expected {[*pixel_values.shape[:2], 2]}, "
                             f"got {list(image_position_ids.shape)}")
        if int(image_position_ids.max()) >= self.cfg.position_embedding_size:
            raise ValueError(f"image_position_ids: position {int(image_position_ids.max())} beyond the "
                             f"position table ({self.cfg.position_embedding_size})")
        feats, counts = self.vision_tower(pixel_values, image_position_ids.long())
        return self.embed_vision(feats), counts

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str = CHECKPOINT_PREFIX) -> None:
        """Copy the vision tensors from a checkpoint's flat {key: tensor} mapping (keys with `prefix`).
        Missing, unexpected or mis-shaped vision tensors raise a ValueError naming them; nothing is copied then."""
        own = self.state_dict()
        wanted = {prefix + k: k for k in own}
        vision_keys = {k for k in tensors if k.startswith(prefix + "vision_tower.")
                       or k.startswith(prefix + "embed_vision.")}
        missing = sorted(set(wanted) - set(tensors))
        unexpected = sorted(vision_keys - set(wanted))
        if missing:
            raise ValueError(f"vision weights missing from the checkpoint: {', '.join(missing[:5])}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            raise ValueError(f"unexpected vision tensors in the checkpoint: {', '.join(unexpected[:5])}"
                             + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        for key, name in wanted.items():
            if tuple(tensors[key].shape) != tuple(own[name].shape):
                raise ValueError(f"{key}: shape {list(tensors[key].shape)}, expected {list(own[name].shape)}")
        with torch.no_grad():
            for key, name in wanted.items():
                own[name].copy_(tensors[key])


# ---- Prompt placement helpers (used by the prefill) ----

def image_block_ids(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, L] ids -> [B, L] run index per row: each contiguous run of image tokens gets 0, 1, ...; text gets -1.
    (begin/end-of-image tokens are text: only `image_token_id` positions belong to a run.)"""
    is_img = input_ids == image_token_id
    prev = torch.zeros_like(is_img)
    prev[:, 1:] = is_img[:, :-1]
    run = torch.cumsum((is_img & ~prev).long(), dim=1) - 1
    return torch.where(is_img, run, torch.full_like(run, -1))


def prefill_attention_mask(block_ids: torch.Tensor, sliding_window: int | None = None,
                           key_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed-attention mask [B, L, L] (True = attend) for a prefill starting at position 0:
    (causal, within the window for sliding layers) OR (query and key in the same image run); AND key_ok (padding).
    An image run is fully bidirectional even where it is longer than the sliding window, as in the reference."""
    B, L = block_ids.shape
    q = torch.arange(L, device=block_ids.device)[:, None]
    k = torch.arange(L, device=block_ids.device)[None, :]
    base = k <= q
    if sliding_window is not None:
        base = base & (q - k < sliding_window)
    same_run = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    allowed = base[None] | same_run
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :].bool()
    return allowed


def place_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Replace, in row-major order, the embeddings at `image_token_id` positions by the soft tokens
    ([total, hidden], images in prompt order). Text embeddings keep their sqrt(hidden) scaling; features have none."""
    slots = input_ids == image_token_id
    n = int(slots.sum())
    if n != features.shape[0]:
        raise ValueError(f"the prompt has {n} image tokens but the images give {features.shape[0]} soft tokens")
    out = embeds.clone()
    out[slots] = features.to(embeds.dtype)
    return out
