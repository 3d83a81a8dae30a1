"""`ConstrainedSampler`: wraps a sampler strategy and edits each step's proposal so that every canvas it commits
continues a valid output.

Per constrained row and step: the inner strategy proposes as usual (its draws, entropies and self-conditioning
are untouched); then the canvas DP (dp.py) replaces `argmax` with the most probable canvas that is a path of the
row's automaton from the state the committed text left it in and can still finish within the row's budget, and
`sampled` with tokens of that path's classes (the inner draw where it fits), so accepted tokens stay valid too. A template's fixed
tokens are clamped: they are written into both the sample and the re-noise ids (so the next input canvas holds them
whatever is accepted) with entropy 0. After a commit the row's state moves to the end of the committed path.
Unconstrained rows (None) pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampler import CanvasSampler, Step
from .automaton import TokenAutomaton
from .dp import ClassScores, best_canvas, draw_in_class, solve


@dataclass
class RowState:
    aut: TokenAutomaton
    state: int  # automaton state after the committed canvases
    used: int  # tokens committed so far
    budget: int  # tokens the output may take, EOS included
    end: int | None = None  # state at the end of the current argmax canvas
    complete: bool = True  # False once no valid output fits the budget (the text stays a valid prefix)

    def left(self, canvas: int) -> torch.Tensor:
        """Budget still unused at each of the canvas's C + 1 boundaries."""
        return (self.budget - self.used - torch.arange(canvas + 1)).clamp_(min=0)


class ConstrainedSampler(CanvasSampler):
    def __init__(self, inner: CanvasSampler, automata: list[TokenAutomaton | None], budget: int):
        super().__init__(inner.model)
        self.inner = inner
        self.row_invariant = inner.row_invariant
        self.canvas_length = inner.model.config.canvas_length
        self.rows = [None if a is None else RowState(a, a.start, 0, budget) for a in automata]

    def live(self, stopped, finished):
        return self.inner.live(stopped, finished)

    def self_conditioning(self):
        return self.inner.self_conditioning()

    def init_canvas(self, live):
        canvas = self.inner.init_canvas(live)
        for b, row in enumerate(self.rows):
            if row is None or not bool(live[b]) or not bool(row.aut.fixed_dst.any()):
                continue
            # place the fixed tokens where a path of uniform scores puts them, so the first pass already sees them
            aut = row.aut
            first = aut.order[aut.offsets[:-1]]
            c = self.canvas_length
            flat = ClassScores(torch.zeros(c, aut.n_classes), first.expand(c, -1))
            path = best_canvas(flat, aut, row.state, row.left(c))
            canvas[b] = torch.where(path.fixed.to(canvas.device), path.argmax.to(canvas.device), canvas[b])
        return canvas

    def _probs(self, b: int) -> torch.Tensor:
        """Row b's step distribution [C, V]: the softmax the inner strategy sampled from."""
        probs = getattr(self.inner, "probs", None)
        if probs is not None:
            return probs[b]
        return torch.softmax(self.inner.logits[b].float(), dim=-1)

    def step(self, hidden, canvas, live, temp) -> Step:
        st = self.inner.step(hidden, canvas, live, temp)
        sampled, argmax, entropy, noise = st.sampled.clone(), st.argmax.clone(), st.entropy.clone(), st.noise.clone()
        for b, row in enumerate(self.rows):
            if row is None or not bool(live[b]):
                continue
            probs = self._probs(b)
            path = solve(probs, row.aut, row.state, row.left(probs.shape[0]))
            dev = argmax.device
            argmax[b] = path.argmax.to(dev)
            sampled[b] = draw_in_class(st.sampled[b], path, row.aut).to(dev)
            if bool(path.fixed.any()):
                fixed = path.fixed.to(dev)
                sampled[b] = torch.where(fixed, argmax[b], sampled[b])
                noise[b] = torch.where(fixed, argmax[b], noise[b])
                entropy[b] = entropy[b].masked_fill(fixed, 0.0)
            row.end, row.complete = int(path.states[-1]), path.complete
        return Step(sampled, argmax, entropy, noise)

    def on_commit(self, ids: torch.Tensor, finished: torch.Tensor) -> None:
        for row in self.rows:
            if row is not None and row.end is not None:
                row.state, row.end = row.end, None
                row.used += ids.shape[1]
