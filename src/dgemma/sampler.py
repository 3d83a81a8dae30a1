"""The entropy-bound sampler: temperature schedule, sampler strategies, acceptance, adaptive stopping.

A `CanvasSampler` strategy owns a generation's random stream and self-conditioning state and proposes each step's
samples; the loop in `generate.py` accepts, re-noises, freezes and commits. `FastSampler` (default) draws per row
with a fused sampler; `ReferenceSampler` draws exactly what the reference draws after `torch.manual_seed(seed)`
(same calls, shapes and order), which makes fp32 generations token-identical. A constrained or infill decoder is a
third strategy, or a wrapper that edits a strategy's `Step`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .numerics import put_rows
from .quant import native


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

    @classmethod
    def from_config(cls, gen) -> StableAndConfident | None:
        """A fresh stopper for one canvas, or None when the generation config disables adaptive stopping."""
        if gen.stability_threshold is None or gen.confidence_threshold is None:
            return None
        return cls(gen.stability_threshold, gen.confidence_threshold)

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


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Positions per chunk: a few MiB of temporaries on CPU, large launches on GPU; never a whole canvas at
    V = 262144."""
    # CPU: two positions per chunk at V = 262144 took 0.70-0.79 of one position's time on two threads (three runs,
    # 256 positions: the row-wise ops split over threads by row) and about the same on one; eight took longer
    budget = 1 << 19 if device.type == "cpu" else 1 << 25
    return max(1, budget // vocab)


# At a real vocabulary (262144) the fused native kernel does a position's work in four passes over its values in
# cache; torch's chunked ops below take several times longer there. Smaller vocabularies (the Sudoku models, the
# test presets) keep the torch ops, whose bits the tests pin.
NATIVE_MIN_VOCAB = 32768


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
    visit: Mapping[int, Callable[[int, torch.Tensor], None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softcap, temperature, softmax, entropy, argmax and an inverse-CDF draw, fused per chunk of positions so no
    fp32 [B, C, V] temporary is ever made.

    raw [B, C, V]: lm_head output before the softcap (any float dtype; not modified). uniforms [B, C] in [0, 1).
    Only rows where `rows` [B] is true are processed; `probs_out` [B, C, V], when given, receives their softmax
    (the next step's self-conditioning input, in its own dtype) and keeps the other rows' previous values.
    `visit` {row: fn(start, probs)}: fn sees each chunk of that row's fp32 softmax (positions start ..) while it is
    in cache (a constrained decoder scores its token classes there instead of re-reading [C, V] from memory).
    Returns sampled ids, argmax ids and entropies of the processed logits, each [B, C] (zeros for skipped rows).
    """
    b, c, v = raw.shape
    table = _scaled_logit_table(raw.dtype, cap, temp, raw.device) if raw.element_size() == 2 else None
    if table is not None and visit is None and v >= NATIVE_MIN_VOCAB:
        done = native.fused_sample(raw, table, uniforms, rows, probs_out)
        if done is not None:
            return done
    sampled = torch.zeros(b, c, dtype=torch.long, device=raw.device)
    argmax = torch.zeros(b, c, dtype=torch.long, device=raw.device)
    ent = torch.zeros(b, c, dtype=torch.float32, device=raw.device)
    step = chunk_rows(v, raw.device)
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
            if visit is not None and r in visit:
                visit[r](s, p)
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


@dataclass
class Step:
    """One denoising step's proposal, each [B, C]."""

    sampled: torch.Tensor  # one draw per position from the step's distribution
    argmax: torch.Tensor
    entropy: torch.Tensor  # of the temperature-scaled distribution (acceptance and stopping read it)
    noise: torch.Tensor  # ids for the positions that are not accepted


class CanvasSampler(abc.ABC):
    """A sampling strategy for one generation. Rows outside `live` keep their previous state."""

    row_invariant: bool  # run the model so that a row's arithmetic does not depend on its batch neighbours
    ranking_is_probs: bool  # `ranking` holds probabilities (else the temperature-scaled logits)
    verifier = None  # a rule check the strategy brings (constrained output: JSON-schema keywords), else None

    def __init__(self, model, reuse: bool = False):
        self.model = model
        self.reuse = reuse  # step cache: keep the last LM-head output to reuse the rows of settled positions
        self.last_head: torch.Tensor | None = None

    def head(self, hidden: torch.Tensor, positions: torch.Tensor | None, fn) -> torch.Tensor:
        """fn(hidden) (an LM head) -> [B, C, V]; with `positions` [B, A] the hidden states are those positions'
        only, and the other rows are the last pass's (step cache)."""
        out = fn(hidden)
        if positions is None:
            self.last_head = out if self.reuse else None
            return out
        return put_rows(self.last_head, positions, out)

    @abc.abstractmethod
    def live(self, stopped: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Rows [B] this strategy still denoises, given rows that stopped this canvas / finished the sequence."""

    @abc.abstractmethod
    def init_canvas(self, live: torch.Tensor) -> torch.Tensor:
        """A fresh uniformly random canvas [B, C]; resets the self-conditioning state."""

    @abc.abstractmethod
    def step(self, hidden: torch.Tensor, canvas: torch.Tensor, live: torch.Tensor, temp,
             visit: Mapping[int, Callable[[int, torch.Tensor], None]] | None = None,
             positions: torch.Tensor | None = None) -> Step:
        """Propose from the decoder's final hidden states [B, C, H]; keep what the next pass conditions on.
        `visit` {row: fn(start, probs)}: hand row's step distribution (fp32, positions start ..) to fn, in chunks.
        `positions` [B, A] (step cache): `hidden` holds these positions only (see `head`)."""

    @abc.abstractmethod
    def ranking(self, row: int) -> torch.Tensor:
        """[C, V]: row's last step distribution, or any tensor ordered like it (for argmaxes over token subsets)."""

    @abc.abstractmethod
    def self_conditioning(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `model.decode_hidden` for the next pass (none on a canvas's first step)."""

    def on_commit(self, ids: torch.Tensor, finished: torch.Tensor) -> None:
        """Called after each canvas is committed (ids [B, C]); strategies that carry state across canvases use it."""


class FastSampler(CanvasSampler):
    """One generator per row, drawn only while the row is live (neither stopped nor finished), so batched and solo
    runs with the same seed agree. The fused sampler draws from one uniform per position and writes the softmax
    straight into the self-conditioning buffer, so no fp32 [B, C, V] temporary is made."""

    row_invariant = True
    ranking_is_probs = True

    def __init__(self, model, seeds: list[int], reuse: bool = False):
        super().__init__(model, reuse)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.probs: torch.Tensor | None = None

    def _draw(self, live: torch.Tensor, out: torch.Tensor, draw) -> torch.Tensor:
        rows = live.nonzero().flatten().tolist()
        if rows:
            out[rows] = torch.stack([draw(self.generators[r]) for r in rows]).to(out.device)
        return out

    def live(self, stopped, finished):
        return ~(stopped | finished)

    def init_canvas(self, live):
        self.probs = None
        b, c, v = len(self.generators), self.model.config.canvas_length, self.model.config.vocab_size
        canvas = torch.zeros(b, c, dtype=torch.long, device=self.model.device)
        return self._draw(live, canvas, lambda g: torch.randint(0, v, (c,), generator=g))

    def step(self, hidden, canvas, live, temp, visit=None, positions=None):
        raw = self.head(hidden, positions, self.model.lm_head_raw)
        b, c, v = raw.shape
        if self.probs is None:
            self.probs = hidden.new_zeros(b, c, v)
        u = torch.zeros(b, c, dtype=torch.float64, device=raw.device)
        self._draw(live, u, lambda g: torch.rand(c, generator=g, dtype=torch.float64))
        sampled, argmax, h = fast_sample(raw, self.model.config.final_logit_softcapping, temp, u, live, self.probs,
                                         visit)
        noise = self._draw(live, canvas.clone(), lambda g: torch.randint(0, v, (c,), generator=g))
        return Step(sampled, argmax, h, noise)

    def self_conditioning(self):
        return {} if self.probs is None else {"sc_probs": self.probs}

    def ranking(self, row):
        return self.probs[row]


class ReferenceSampler(CanvasSampler):
    """The reference's ops and draws: softcapped fp32 logits, temperature, softmax, `torch.multinomial`, argmax,
    Categorical entropy, then `torch.randint` re-noise ids for every row, all from one generator; the processed
    logits are the next step's self-conditioning input. Every row is computed until it stops, as in the reference."""

    row_invariant = False
    ranking_is_probs = False

    def __init__(self, model, seed: int, reuse: bool = False):
        super().__init__(model, reuse)
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        self.logits: torch.Tensor | None = None

    def _noise(self) -> torch.Tensor:
        b, c, v = self.batch, self.model.config.canvas_length, self.model.config.vocab_size
        return torch.randint(0, v, (b, c), generator=self.generator, device=self.model.device)

    def live(self, stopped, finished):
        return ~stopped

    def init_canvas(self, live):
        self.logits, self.batch = None, live.shape[0]
        return self._noise()

    def step(self, hidden, canvas, live, temp, visit=None, positions=None):
        logits = self.head(hidden, positions, self.model.lm_head)
        if temp is not None:
            logits = logits / temp
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        for r, fn in (visit or {}).items():
            fn(0, probs[r])
        sampled = torch.multinomial(probs.flatten(0, 1), num_samples=1, generator=self.generator).view(canvas.shape)
        del probs
        out = Step(sampled, logits.argmax(dim=-1), entropy(logits), self._noise())
        new = logits.to(self.model.dtype)
        self.logits = new if self.logits is None else torch.where(live[:, None, None], new, self.logits)
        return out

    def self_conditioning(self):
        return {} if self.logits is None else {"sc_logits": self.logits}

    def ranking(self, row):
        return self.logits[row]
