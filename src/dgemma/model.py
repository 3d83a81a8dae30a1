"""The DiffusionGemma text stack: one set of layers used in two roles.

- encode(): causal over prompt / committed canvases, writes the KV cache (the "encoder").
- decode(): bidirectional over the canvas, reads the cache, returns softcapped fp32 logits (the "decoder").

Numerics follow the reference op for op (fp32 norms, fp32 router softmax, casts in the same places), so fp32
logits agree to ~1e-6 and bf16 stays close.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec, ModelConfig
from .kv_cache import KVCache
from .numerics import MIN_ROWS, ROW_INVARIANT, RMSNorm, gelu_mul, linear, softcap, take_rows
from .quant import native
from .vision import PromptImages


PREFILL_CHUNK = 1024  # prompt tokens per encoder pass: bounds activations and attention masks on long prompts


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Inverse frequencies, length head_dim / 2. "proportional" rotates the first partial_rotary_factor of the
    angles (exponents over the full head_dim) and leaves the rest unrotated (zero frequency)."""
    d = spec.head_dim
    if spec.rope_type == "proportional":
        angles = int(spec.partial_rotary_factor * d // 2)
        rotated = 1.0 / (spec.rope_theta
                         ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / d))
        return torch.cat([rotated, torch.zeros(d // 2 - angles, device="cpu")]) / spec.rope_factor
    dim = int(d * spec.partial_rotary_factor)
    return 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B or 1, L] -> cos, sin [B or 1, L, head_dim] in the activation dtype."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; rotate-half convention."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Module):
    """Bias-free linear layer with nn.Linear's state-dict name (`weight` [out, in]), using `linear`. Weights are
    left uninitialised: they always come from a checkpoint or an explicit init."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Embedding(nn.Module):
    """The token table, also the tied LM head and the self-conditioning soft embedding. `compute_dtype` (None: the
    table's own dtype) is the activations' dtype: a 16-bit table computing in fp32 (a CPU without native bf16)
    stays 16-bit in memory and is upcast CHUNK vocabulary rows at a time, never as a whole."""

    CHUNK = 16384  # rows upcast at once: 176 MiB in fp32 at H = 2816

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        self.compute_dtype: torch.dtype | None = None
        self._mean: tuple[tuple, torch.Tensor] | None = None  # (key, mean row): see mean_row

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or self.weight.dtype

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table, in the compute dtype (gathered first, then upcast: exact)."""
        return F.embedding(ids, self.weight).to(self.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] @ table.T -> [..., V]."""
        w = self.weight
        fast = native.head_product(hidden, w) if self._native(hidden) else None
        if fast is not None:
            return fast
        if w.dtype == self.dtype:
            return linear(hidden, w)
        out = hidden.new_empty(*hidden.shape[:-1], w.shape[0])
        for s in range(0, w.shape[0], self.CHUNK):
            out[..., s:s + self.CHUNK] = linear(hidden, w[s:s + self.CHUNK].to(self.dtype))
        return out

    def soft(self, probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """probs [..., V] @ table -> [..., H] (the expected embedding under probs). With `top_k` (step cache): only
        each row's k most likely tokens are gathered; the rest of its mass goes to the table's mean row."""
        w = self.weight
        if top_k is not None and top_k < w.shape[0]:
            p, ids = probs.topk(top_k, dim=-1)
            rows = F.embedding(ids, w).to(self.dtype)  # [..., k, H]
            out = (p.to(self.dtype).unsqueeze(-2) @ rows).squeeze(-2)
            tail = (1 - p.float().sum(-1, keepdim=True)).clamp_(min=0)
            return out.add_(tail.to(self.dtype) * self.mean_row())
        fast = native.table_product(probs, w) if self._native(probs) else None
        if fast is not None:
            return fast
        if w.dtype == self.dtype:
            return linear(probs, w.t())
        out = None
        for s in range(0, w.shape[0], self.CHUNK):
            part = linear(probs[..., s:s + self.CHUNK], w[s:s + self.CHUNK].to(self.dtype).t())
            out = part if out is None else out.add_(part)
        return out

    def _native(self, x: torch.Tensor) -> bool:
        """Whether head() / soft() ask the native products first (they read the table in place, one summation order
        whatever the rows). A table in the compute dtype: only for generation under the default sampler
        (row_invariant()); elsewhere torch's matmul keeps the reference's bits. A 16-bit table computed in fp32 has
        no such bits to keep (the alternative upcasts it chunk by chunk at every call): always."""
        return x.dtype == self.dtype and (ROW_INVARIANT.get() or self.weight.dtype != self.dtype)

    def mean_row(self) -> torch.Tensor:
        """The table's mean row [H] in the compute dtype, kept until the table changes (its storage or version
        counter; a table loaded as an inference tensor has no counter and is not trained in place)."""
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version, self.dtype)
        if self._mean is None or self._mean[0] != key:
            total = sum(w[s:s + self.CHUNK].float().sum(0) for s in range(0, w.shape[0], self.CHUNK))
            self._mean = (key, (total / w.shape[0]).to(self.dtype))
        return self._mean[1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, spec.num_kv_heads, spec.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim)
        self.k_proj = Linear(h, self.n_kv * self.head_dim)
        self.v_proj = Linear(h, self.n_kv * self.head_dim) if spec.has_v_proj else None
        self.o_proj = Linear(self.n_heads * self.head_dim, h)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        *,
        write_cache: bool,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """write_cache: append this pass's K/V to the cache (encoder); else read it, K/V in scratch (decoder).
        `slots` [B, A]: `x` holds only these canvas positions (step cache; see KVCache.read)."""
        b, length, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, length, -1, self.head_dim)), cos, sin)
        k_raw = self.k_proj(x).view(b, length, -1, self.head_dim)
        v = self.v_proj(x).view(b, length, -1, self.head_dim) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = self.v_norm(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        qstart = cache.length  # the first query's absolute slot (the canvas follows the cache)
        k, v, kstart = cache.write(layer, k, v) if write_cache else cache.read(layer, k, v, slots)
        if mask is not None and mask.dim() == 3:  # per-row mask (image runs): broadcast over heads
            mask = mask[:, None]
        if cache.pad_list is None:
            out = self._sdpa(q, k, v, mask)
        else:  # padded batch: each row attends over its own keys only, with the shapes it would have alone
            out = torch.zeros_like(q)
            for r, p in enumerate(cache.pad_list):
                qo, ko = max(0, p - qstart), max(0, p - kstart)
                if qo < length:
                    m = None if mask is None else mask[qo:, ko:] if mask.dim() == 2 else mask[r:r + 1, :, qo:, ko:]
                    out[r:r + 1, :, qo:] = self._sdpa(q[r:r + 1, :, qo:], k[r:r + 1, :, ko:], v[r:r + 1, :, ko:], m)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))

    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=self.n_kv != self.n_heads)


class MLP(nn.Module):
    """Gated GELU-tanh MLP (dense branch and self-conditioning)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = Linear(cfg.hidden_size, cfg.num_experts)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] fp32, expert ids [T, K])."""
        probs = self.probabilities(x)
        return self.weigh(probs, torch.topk(probs, k=self.top_k, dim=-1).indices)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> fp32 [T, E]: the softmax over the experts."""
        return torch.softmax(self.proj(self.norm(x) * self.scale * self.root), dim=-1, dtype=torch.float32)

    def weigh(self, probs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen experts' weights: their probabilities renormalised, times each expert's scale; with idx."""
        weights = probs.gather(-1, idx)
        return weights / weights.sum(dim=-1, keepdim=True) * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Packed experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> weighted sum of each token's top-k experts. Assignments are grouped by expert for the
        matmuls; the weighted outputs are summed per token over its k slots in fp32 and rounded once, which is
        the reference's arithmetic."""
        n_tok, top_k = idx.shape
        n_exp = self.gate_up_proj.shape[0]
        flat = idx.reshape(-1)
        expert, perm = torch.sort(flat)
        counts = torch.bincount(flat, minlength=n_exp)
        xs = x.index_select(0, perm // top_k)  # index_select, not x[...]: advanced indexing is slow on CPU
        if ROW_INVARIANT.get():
            out = self._batched(xs, expert, counts)
        else:
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gate, up = grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offsets).chunk(2, dim=-1)
            out = grouped_mm(gelu_mul(gate, up), self.down_proj.transpose(-2, -1), offsets)
        # fp32 product (what type promotion gives), in token order, then the k-sum and one rounding
        weighted = out.float().mul_(weights.reshape(-1).index_select(0, perm).unsqueeze(-1))
        by_token = torch.empty_like(weighted).index_copy_(0, perm, weighted)
        return by_token.view(n_tok, top_k, -1).sum(dim=1).to(x.dtype)

    def _batched(self, xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in two batched matmuls over [E, capacity, H] (each expert's tokens padded to the busiest
        expert's count, at least MIN_ROWS so a token's result does not depend on how many share its expert)."""
        n_exp, hidden = self.gate_up_proj.shape[0], xs.shape[1]
        cap = max(int(counts.max()), MIN_ROWS)
        rank = torch.arange(xs.shape[0], device=xs.device) - (torch.cumsum(counts, 0) - counts)[expert]
        slot = expert * cap + rank  # row of each assignment in the flattened [E * cap] buffer
        buf = xs.new_zeros(n_exp * cap, hidden).index_copy_(0, slot, xs).view(n_exp, cap, hidden)
        gate, up = torch.bmm(buf, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(gelu_mul(gate, up), self.down_proj.transpose(1, 2))
        return out.view(n_exp * cap, -1).index_select(0, slot)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by group) times their group's w [G, in, out]; offsets = cumulative group ends."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x.to(w.dtype), w, offs=offsets)
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(h, eps))
        # The decoder's scalar is a weight; the encoder stores its own copy (not tied).
        self.layer_scalar = nn.Parameter(torch.ones(1))
        self.encoder_layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x, rope, cache: KVCache, layer: int, *, write_cache: bool, encoder_scalar: bool,
                mask: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, cache, layer, write_cache=write_cache, mask=mask,
                           slots=slots)
        )
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(-1, h.shape[-1])
        weights, idx = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), weights, idx).reshape(h.shape)
        out = h + self.post_feedforward_layernorm(dense + self.post_feedforward_layernorm_2(moe))
        return out * (self.encoder_layer_scalar if encoder_scalar else self.layer_scalar)


class DiffusionGemma(nn.Module):
    """Weights and the two forward roles. Generation lives in dgemma.generate; this class wires it in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.embed_tokens = Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(Layer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.sc_pre_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.sc_mlp = MLP(h, cfg.intermediate_size)
        self.sc_post_norm = RMSNorm(h, cfg.rms_norm_eps, with_scale=False)
        self.vision = None  # VisionEncoder, set by the loader when the checkpoint has a vision tower
        self.prefill_chunk = PREFILL_CHUNK
        self._inv_freq: dict[str, torch.Tensor] = {}
        for spec in cfg.layers:
            self._inv_freq.setdefault(spec.kind, rope_inv_freq(spec))

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype."""
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(self.config.hidden_size**0.5).to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens.lookup(ids) * self.embed_scale(self.dtype).to(self.device)

    def _ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: rope_cos_sin(f, positions, dtype) for kind, f in self._inv_freq.items()}

    def lm_head_raw(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head in the activation dtype, before the fp32 softcap."""
        return self.embed_tokens.head(hidden)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head, fp32 softcap."""
        return softcap(self.lm_head_raw(hidden).float(), self.config.final_logit_softcapping)

    # -- roles --------------------------------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, cache: KVCache, chunk: int | None = None,
               images: PromptImages | None = None) -> torch.Tensor:
        """Causal pass over new tokens [B, L], `chunk` (default `self.prefill_chunk`) tokens at a time; appends to
        the cache. Each chunk attends to itself and to the cache, so memory grows with chunk x cached keys, never
        with L x L. `images` places image soft tokens (and, for bidirectional image runs, keeps each run inside one
        chunk). Returns the final-normed hidden states."""
        chunk = chunk or self.prefill_chunk
        length = ids.shape[1]
        ends = images.chunk_ends(length, chunk) if images is not None else range(chunk, length + chunk, chunk)
        out, start = [], 0
        for end in ends:
            out.append(self._encode_chunk(ids[:, start:min(end, length)], cache, images, start))
            start = end
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _encode_chunk(self, ids: torch.Tensor, cache: KVCache, images: PromptImages | None = None,
                      offset: int = 0) -> torch.Tensor:
        length, start, dev = ids.shape[1], cache.length, ids.device
        x = self.embed(ids)
        if images is not None:
            x = images.embed(x, offset)
        ropes = self._ropes(cache.positions(start, length, dev), x.dtype)
        qslot = torch.arange(start, start + length, device=dev)
        masks: dict[tuple[str, int], torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            spec, n = self.config.layers[i], cache.stored(i)
            if (spec.kind, n) not in masks:
                kslot = torch.arange(cache.start[i], cache.start[i] + n + length, device=dev)
                allowed = kslot[None, :] <= qslot[:, None]
                if spec.sliding:
                    allowed &= qslot[:, None] - kslot[None, :] < self.config.sliding_window
                same_run = images.same_run(offset, length, n) if images is not None else None
                if same_run is not None:  # each image run also sees all of itself (per row)
                    allowed = allowed[None] | same_run
                # additive, built once per layer kind (SDPA would convert a boolean mask in every layer)
                masks[spec.kind, n] = torch.zeros(allowed.shape, dtype=x.dtype, device=dev).masked_fill_(
                    ~allowed, float("-inf"))
            x = layer(x, ropes[spec.kind], cache, i, write_cache=True, encoder_scalar=True, mask=masks[spec.kind, n])
        cache.advance(length)
        return self.norm(x)

    def decode(self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising forward over the canvas [B, C] -> fp32 softcapped logits [B, C, V]."""
        return self.lm_head(self.decode_hidden(canvas, cache, sc_logits))

    def decode_hidden(self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None,
                      sc_probs: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, sc_top_k: int | None = None) -> torch.Tensor:
        """The decoder stack up to the final norm. `sc_probs` may replace softmax(sc_logits) when the caller
        already holds it in the embedding dtype; `sc_mask` [B] (training) zeroes the signal for some rows.
        `positions` [B, A] (step cache): compute only these canvas positions -> [B, A, H]; they attend to the
        other positions' K/V as the cache's scratch holds them from an earlier pass over this canvas. `sc_top_k`
        (step cache): the soft embedding from each position's k most likely tokens (`Embedding.soft`)."""
        length = canvas.shape[1]
        if positions is not None:
            canvas = canvas.gather(1, positions)
        x = self.embed(canvas)
        if sc_logits is not None or sc_probs is not None:
            signal = sc_probs if sc_probs is not None else sc_logits
            if positions is not None:  # the computed positions' rows only (softmax is per row: gather first)
                signal = take_rows(signal, positions)
            if sc_probs is None:
                signal = torch.softmax(signal, dim=-1, dtype=torch.float32).to(self.dtype)
            soft = self.embed_tokens.soft(signal, sc_top_k) * self.embed_scale(x.dtype).to(x.device)
            if sc_mask is not None:
                soft = soft * sc_mask.to(soft.dtype)[:, None, None]
            x = x + self.sc_mlp(self.sc_pre_norm(soft))
        # (With no previous logits the signal is zero and the MLP adds exactly zero.)
        x = self.sc_post_norm(x)
        pos = cache.positions(cache.length, length, canvas.device)
        if positions is not None:
            pos = pos.expand(canvas.shape[0], -1).gather(1, positions)
        ropes = self._ropes(pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes[self.config.layers[i].kind], cache, i, write_cache=False, encoder_scalar=False,
                      slots=positions)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_tokens: int, pad: torch.Tensor | None = None,
                  scratch: int | None = None) -> KVCache:
        """A cache for up to `max_tokens` encoded positions and canvases of `scratch` (default canvas_length)."""
        return KVCache(self.config, batch_size, max_tokens, self.device, self.dtype, pad, scratch)
