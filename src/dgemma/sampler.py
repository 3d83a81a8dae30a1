"""The entropy-bound sampler: temperature schedule, sampling, acceptance, re-noising, adaptive stopping.

Random numbers come from a `CanvasRNG`. `ReferenceRNG` draws exactly what the reference draws after
`torch.manual_seed(seed)` (same calls, shapes and order), which makes fp32 generations token-identical.
"""

from __future__ import annotations

import abc

import torch


class CanvasRNG(abc.ABC):
    """Source of the two random draws the sampler needs."""

    @abc.abstractmethod
    def noise(self, batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
        """Uniform random token ids [batch, length] (canvas init and re-noising)."""

    @abc.abstractmethod
    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """One categorical draw per row of probs [N, V] -> [N]."""


class ReferenceRNG(CanvasRNG):
    """torch.randint / torch.multinomial on a private generator seeded like torch.manual_seed(seed)."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.device = device

    def noise(self, batch, length, vocab, device):
        return torch.randint(0, vocab, (batch, length), generator=self.generator, device=self.device).to(device)

    def sample(self, probs):
        return torch.multinomial(probs.to(self.device), num_samples=1, generator=self.generator).squeeze(-1).to(probs.device)


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """t = t_min + (t_max - t_min) * n / N, with n the steps remaining; evaluated in fp32 like the reference."""
    return t_min + (t_max - t_min) * (torch.tensor(step, dtype=torch.int32) / max_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim (same arithmetic as torch.distributions.Categorical)."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    norm = torch.clamp(norm, min=torch.finfo(norm.dtype).min)
    return -(norm * probs).sum(-1)


def accept_mask(token_entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the largest low-entropy prefix with sum(H) - max(H) <= bound (arXiv 2505.24857)."""
    sorted_h, order = torch.sort(token_entropy, dim=-1, descending=False)
    selected = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


class StableAndConfident:
    """A row stops when its argmax canvas has not changed for `stability` steps and its mean entropy is below
    `confidence`."""

    def __init__(self, stability: int, confidence: float):
        self.stability = stability
        self.confidence = confidence
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (mean_entropy < self.confidence)


class FastRNG:
    """One generator per row, drawn only while the row is active, so a row's tokens do not depend on its batch
    neighbours: batched and solo runs with the same seed agree. Sampling uses one uniform per position."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(s)
            self.generators.append(g)
        self.device = device

    def noise_rows(self, rows: list[int], length: int, vocab: int) -> torch.Tensor:
        """[len(rows), length] uniform ids for the given rows."""
        out = torch.stack([torch.randint(0, vocab, (length,), generator=self.generators[r]) for r in rows])
        return out.to(self.device)

    def uniform_rows(self, rows: list[int], length: int) -> torch.Tensor:
        out = torch.stack([torch.rand(length, generator=self.generators[r], dtype=torch.float64) for r in rows])
        return out.to(self.device)


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Positions per chunk: cache-sized temporaries on CPU, large launches on GPU; never a whole canvas at
    V = 262144."""
    budget = 1 << 17 if device.type == "cpu" else 1 << 25  # CPU: ~512 KiB temporaries stay in L2
    return max(1, budget // vocab)


def _scale_logits(x: torch.Tensor, cap: float | None, temp: torch.Tensor | float | None) -> torch.Tensor:
    """fp32 logits -> cap * tanh(x / cap) / temp, in place, in the reference's op order."""
    if cap:
        x.div_(cap).tanh_().mul_(cap)
    if temp is not None:
        x.div_(temp)
    return x


def _scaled_logit_table(dtype: torch.dtype, cap: float | None, temp, device: torch.device) -> torch.Tensor:
    """`_scale_logits` of every 16-bit float, indexed by its bit pattern + 2^15. With bf16/fp16 weights the head
    output has at most 65536 distinct values, so softcap and temperature become one gather per element instead of
    a tanh over the whole vocabulary (most of the sampler's time on CPU), with bit-identical results."""
    codes = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32, device=device).to(torch.int16).view(dtype)
    return _scale_logits(codes.to(torch.float32), cap, temp)


def fast_sample(
    raw: torch.Tensor,
    cap: float | None,
    temp: torch.Tensor | float | None,
    uniforms: torch.Tensor,
    rows: torch.Tensor,
    probs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softcap, temperature, softmax, entropy, argmax and an inverse-CDF draw, fused per chunk of positions so no
    fp32 [B, C, V] temporary is ever made.

    raw [B, C, V]: lm_head output before the softcap (any float dtype; not modified). uniforms [B, C] in [0, 1).
    Only rows where `rows` [B] is true are processed; `probs_out` [B, C, V], when given, receives their softmax
    (the next step's self-conditioning input, in its own dtype) and keeps the other rows' previous values.
    Returns sampled ids, argmax ids and entropies of the processed logits, each [B, C] (zeros for skipped rows).
    """
    b, c, v = raw.shape
    sampled = torch.zeros(b, c, dtype=torch.long, device=raw.device)
    argmax = torch.zeros(b, c, dtype=torch.long, device=raw.device)
    ent = torch.zeros(b, c, dtype=torch.float32, device=raw.device)
    step = chunk_rows(v, raw.device)
    table = _scaled_logit_table(raw.dtype, cap, temp, raw.device) if raw.element_size() == 2 else None
    for r in rows.nonzero().flatten().tolist():
        for s in range(0, c, step):
            if table is not None:
                codes = raw[r, s:s + step].view(torch.int16).to(torch.int32).add_(1 << 15)
                x = table.index_select(0, codes.view(-1)).view(codes.shape)  # faster than table[codes] on CPU
            else:
                x = _scale_logits(raw[r, s:s + step].to(torch.float32, copy=True), cap, temp)
            m, idx = x.max(dim=-1, keepdim=True)
            x.sub_(m)  # shifted logits
            p = torch.exp(x)
            z = p.sum(dim=-1, keepdim=True)
            p.div_(z)
            ent[r, s:s + step] = torch.log(z).squeeze(-1) - (p * x).sum(dim=-1)
            argmax[r, s:s + step] = idx.squeeze(-1)
            if probs_out is not None:
                probs_out[r, s:s + step] = p
            cdf = torch.cumsum(p, dim=-1, out=x)  # reuse the buffer
            total = cdf[:, -1:]
            # strictly below the total, so the draw never lands past the last token with mass
            target = torch.minimum(uniforms[r, s:s + step, None].to(cdf.dtype) * total,
                                   torch.nextafter(total, torch.zeros_like(total)))
            draw = torch.searchsorted(cdf, target, right=True).squeeze(-1)
            sampled[r, s:s + step] = draw.clamp_(max=v - 1)
    return sampled, argmax, ent
