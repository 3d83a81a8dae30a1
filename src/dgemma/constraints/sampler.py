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
from .dp import CanvasPlan, ClassScorer, ClassScores, best_canvas, draw_in_class, plan_canvas


@dataclass
class RowState:
    aut: TokenAutomaton
    state: int  # automaton state after the committed canvases
    used: int  # tokens committed so far
    budget: int  # tokens the output may take, EOS included
    end: int | None = None  # state at the end of the current argmax canvas
    complete: bool = True  # False once no valid output fits the budget (the text stays a valid prefix)
    plan: CanvasPlan | None = None  # the current canvas's plan (same for all its steps)

    def left(self, canvas: int) -> torch.Tensor:
        """Budget still unused at each of the canvas's C + 1 boundaries."""
        return (self.budget - self.used - torch.arange(canvas + 1)).clamp_(min=0)

    def plan_for(self, canvas: int) -> CanvasPlan:
        if self.plan is None:
            self.plan = plan_canvas(self.aut, self.state, self.left(canvas))
        return self.plan


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
            c = self.canvas_length
            flat = ClassScores(torch.zeros(c, aut.n_classes), None)
            path = best_canvas(flat, aut, row.state, row.left(c), row.plan_for(c))
            canvas[b] = torch.where(path.fixed.to(canvas.device), path.argmax.to(canvas.device), canvas[b])
        return canvas

    def ranking(self, row):
        return self.inner.ranking(row)

    def step(self, hidden, canvas, live, temp, visit=None, positions=None) -> Step:
        c = self.canvas_length
        scorers = {b: ClassScorer(row.aut, c) for b, row in enumerate(self.rows) if row is not None and bool(live[b])}
        st = self.inner.step(hidden, canvas, live, temp, visit={**(visit or {}), **scorers}, positions=positions)
        sampled, argmax, entropy, noise = st.sampled.clone(), st.argmax.clone(), st.entropy.clone(), st.noise.clone()
        dev = argmax.device
        for b, scorer in scorers.items():
            row = self.rows[b]
            path = best_canvas(scorer.scores(self.inner.ranking(b)), row.aut, row.state, row.left(c), row.plan_for(c),
                               st.argmax[b])
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
                row.state, row.end, row.plan = row.end, None, None
                row.used += ids.shape[1]
