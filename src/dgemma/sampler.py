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
