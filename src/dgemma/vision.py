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

from .images import preprocess_images
from .numerics import RMSNorm, rms_norm

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
        # A one-hot averaging matrix times the features: the reference's arithmetic (weights 1/k^2, one GEMM), so the
        # soft tokens are bit-identical to its. Padding patches land in slot 0 with zero features.
        weights = F.one_hot(slot, length).float() / (k * k)  # [n, P, length]
        out = weights.transpose(1, 2) @ h.masked_fill(padding.unsqueeze(-1), 0.0).float()
        filled = ~(weights == 0).all(dim=1)
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


# ---- A prompt's images, ready for the chunked prefill ----

@dataclass
class PromptImages:
    """The soft tokens of a (padded) prompt batch and where they go.

    features [n, text hidden]: all images' soft tokens in prompt order (row by row);
    index [B, L]: the feature row placed at each image-token slot, -1 elsewhere;
    runs [B, L] or None: image-run id per position (-1 for text) when runs attend to themselves bidirectionally.
    """

    features: torch.Tensor
    index: torch.Tensor
    runs: torch.Tensor | None

    def chunk_ends(self, length: int, chunk: int) -> list[int]:
        """Chunk boundaries for a prefill of `length` tokens: every `chunk` tokens, moved forward where a boundary
        would split an image run (a run must see all of itself in one pass)."""
        ends, pos = [], 0
        inside = (self.runs[:, 1:] >= 0) & (self.runs[:, 1:] == self.runs[:, :-1]) if self.runs is not None else None
        while pos < length:
            end = min(pos + chunk, length)
            if inside is not None:
                while end < length and bool(inside[:, end - 1].any()):  # slots end-1 and end share a run
                    end += 1
            ends.append(end)
            pos = end
        return ends

    def embed(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Replace the image-token embeddings of the chunk starting at `start` ([B, len, H], in place)."""
        idx = self.index[:, start:start + x.shape[1]]
        slots = idx >= 0
        if bool(slots.any()):
            x[slots] = self.features.index_select(0, idx[slots]).to(x.dtype)
        return x

    def same_run(self, start: int, length: int, cached: int) -> torch.Tensor | None:
        """[B, len, cached + len] True where query and key lie in the same image run (keys: `cached` earlier
        positions, which never share a run with this chunk, then the chunk), or None when the chunk has no run."""
        if self.runs is None:
            return None
        rq = self.runs[:, start:start + length]
        if not bool((rq >= 0).any()):
            return None
        rk = torch.cat([torch.full((rq.shape[0], cached), -1, dtype=rq.dtype, device=rq.device), rq], dim=1)
        return (rq[:, :, None] == rk[:, None, :]) & (rq[:, :, None] >= 0)


def prompt_images(model, ids: torch.Tensor, images=None, pixel_values: torch.Tensor | None = None,
                  image_position_ids: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                  max_soft_tokens: int | None = None) -> PromptImages | None:
    """A prompt's images -> its PromptImages (None for a text prompt): `images` (PIL images, paths or bytes) go
    through the model's image processor; `pixel_values` + `image_position_ids` are processor outputs. The vision
    tower runs here."""
    if images is not None:
        if pixel_values is not None or image_position_ids is not None:
            raise ValueError("pass either images or pixel_values/image_position_ids, not both")

        processed = preprocess_images(images, max_soft_tokens=max_soft_tokens, config=model.image_processor)
        pixel_values, image_position_ids = processed["pixel_values"], processed["image_position_ids"]
    elif pixel_values is None and image_position_ids is None:
        return None
    elif pixel_values is None or image_position_ids is None:
        raise ValueError("pixel_values and image_position_ids go together")
    if model.vision is None:
        raise ValueError("this checkpoint has no vision tower: it cannot take images")
    for name, t in (("pixel_values", pixel_values), ("image_position_ids", image_position_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if pixel_values.dim() == 2:  # one image
        pixel_values, image_position_ids = pixel_values[None], image_position_ids[None]
    w = next(model.vision.parameters())
    features, counts = model.vision(pixel_values.to(w.device, w.dtype), image_position_ids.to(w.device))
    if mm_token_type_ids is not None:
        mm_token_type_ids = torch.as_tensor(mm_token_type_ids, device=ids.device)
    cfg = model.config
    return place_soft_tokens(ids, features, counts, cfg.image_token_id, cfg.vision_bidirectional, mm_token_type_ids)


def place_soft_tokens(ids: torch.Tensor, features: torch.Tensor, counts: list[int], image_token_id: int,
                      bidirectional: bool, mm_token_type_ids: torch.Tensor | None = None) -> PromptImages:
    """Match the soft tokens of the images to the prompt's placeholder ids (in order, row by row, like the
    reference's masked_scatter). Image runs come from `mm_token_type_ids` (1 or 2 = vision) when given, as the
    reference's generate() reads them, else from the placeholder ids (what the processor marks)."""
    slots = ids == image_token_id
    n_slots = int(slots.sum())
    if n_slots != features.shape[0]:
        raise ValueError(f"the prompt holds {n_slots} image tokens (id {image_token_id}) but the images give "
                         f"{features.shape[0]} soft tokens ({', '.join(map(str, counts))} per image): each image "
                         "needs begin-of-image, that many image tokens and end-of-image in the prompt")
    index = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
    index[slots] = torch.arange(n_slots, device=ids.device)
    runs = None
    if bidirectional:
        if mm_token_type_ids is not None:
            if tuple(mm_token_type_ids.shape) != tuple(ids.shape):
                raise ValueError(f"mm_token_type_ids must have the prompt's shape {list(ids.shape)}, "
                                 f"got {list(mm_token_type_ids.shape)}")
            vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
            runs = image_block_ids(torch.where(vision, image_token_id, -1).to(ids.device), image_token_id)
        else:
            runs = image_block_ids(ids, image_token_id)
    return PromptImages(features, index, runs)
