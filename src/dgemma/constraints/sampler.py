"""`ConstrainedSampler`: wraps a sampler strategy and edits each step's proposal so that every canvas it commits
continues a valid output.

Per constrained row and step: the inner strategy proposes as usual (its draws, entropies and self-conditioning
are untouched); then the canvas DP (dp.py) replaces `argmax` with the most probable canvas that is a path of the
row's automaton from the state the committed text left it in and can still finish within the row's budget, and
`sampled` with tokens of that path's classes (the inner draw where it fits), so accepted tokens stay valid too.
A template's fixed tokens are clamped: they are written into both the sample and the re-noise ids (so the next
input canvas holds them whatever is accepted) with entropy 0. After a commit the row's state moves to the end of
the committed path.
Unconstrained rows (None) pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampler import CanvasSampler, Step
from .automaton import TokenAutomaton
from .dp import CanvasPath, CanvasPlan, ClassScorer, ClassScores, best_canvas, draw_in_class, plan_canvas

REPAIR_ROUNDS = 8  # DP re-runs per step that steer the argmax canvas off what the verifier rejects
PENALTY = -1e3  # added to a rejected class's log-probability at its position (finite: the path stays valid)


@dataclass
class RowState:
    aut: TokenAutomaton
    state: int  # automaton state after the committed canvases
    used: int  # tokens committed so far
    budget: int  # tokens the output may take, EOS included
    end: int | None = None  # state at the end of the current argmax canvas
    complete: bool = True  # False once no valid output fits the budget (the text stays a valid prefix)
    plan: CanvasPlan | None = None  # the current canvas's plan (same for all its steps)
    prefix: bytearray = None  # the committed output's bytes (rows whose automaton has a verifier)
    doomed: bool = False  # the committed text breaks the schema: the output may not end (finish_reason length)

    def __post_init__(self):
        self.prefix = bytearray()

    def text_of(self, tokens: torch.Tensor) -> tuple[list[int], bool]:
        """Byte length of each token of a canvas up to its first non-text token, and whether that is EOS."""
        pieces = self.aut.pieces
        lengths = []
        for t in tokens.tolist():
            p = pieces[t] if 0 <= t < len(pieces) else None
            if not p:
                return lengths, t in self.aut.eos_ids
            lengths.append(len(p))
        return lengths, False

    def rejected(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """bool [C]: positions of `tokens` (a canvas after the committed text) inside a span the verifier
        rejects; None when nothing is rejected. Spans wholly in the committed text mark the row doomed."""
        lengths, complete = self.text_of(tokens)
        pieces = self.aut.pieces
        data = bytes(self.prefix) + b"".join(pieces[t] for t in tokens[:len(lengths)].tolist())
        spans = self.aut.check.offending(data, complete)
        if spans == []:
            return None
        bad = torch.zeros(tokens.numel(), dtype=torch.bool)
        if spans is None:  # not one JSON value: cannot happen under the automaton; reject the whole canvas
            bad[:] = True
            return bad
        base = len(self.prefix)
        ends = torch.tensor(lengths, dtype=torch.int64).cumsum(0) + base
        starts = ends - torch.tensor(lengths, dtype=torch.int64)
        for s, e in spans:
            if e == base and lengths:  # finished by this canvas's first token (a number's end): continue it
                bad[0] = True
                continue
            if e <= base:
                self.doomed = True
                continue
            bad[:len(lengths)] |= (starts < e) & (ends > s)
        if complete and len(lengths) < tokens.numel():
            bad[len(lengths)] = True  # the EOS of an output that does not validate
        return bad

    def left(self, canvas: int) -> torch.Tensor:
        """Budget still unused at each of the canvas's C + 1 boundaries."""
        return (self.budget - self.used - torch.arange(canvas + 1)).clamp_(min=0)

    def plan_for(self, canvas: int) -> CanvasPlan:
        if self.plan is None:
            self.plan = plan_canvas(self.aut, self.state, self.left(canvas))
        return self.plan


def _in_class(aut: TokenAutomaton, scores: ClassScores, j: int, k: int, banned: set[int]) -> int | None:
    """The most probable token of class `k` at position `j` that is not `banned` (None: there is none)."""
    members = aut.order[aut.offsets[k]:aut.offsets[k + 1]]
    if members.numel() <= len(banned):
        ok = torch.tensor([int(t) not in banned for t in members.tolist()], dtype=torch.bool)
        members = members[ok]
        if members.numel() == 0:
            return None
    if scores.ranking is None:
        for t in members.tolist():
            if t not in banned:
                return t
        return None
    vals = scores.ranking[j].index_select(0, members.to(scores.ranking.device)).float().cpu()
    for i in torch.argsort(vals, descending=True, stable=True).tolist():
        if int(members[i]) not in banned:
            return int(members[i])
    return None


class ConstrainedSampler(CanvasSampler):
    def __init__(self, inner: CanvasSampler, automata: list[TokenAutomaton | None], budget: int):
        super().__init__(inner.model)
        self.inner = inner
        self.row_invariant = inner.row_invariant
        self.ranking_is_probs = inner.ranking_is_probs
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
            scores = scorer.scores(self.inner.ranking(b))
            path = best_canvas(scores, row.aut, row.state, row.left(c), row.plan_for(c), st.argmax[b])
            if row.aut.check is not None:
                path = self.repair(row, scores, path, st.argmax[b])
            argmax[b] = path.argmax.to(dev)
            sampled[b] = draw_in_class(st.sampled[b], path, row.aut).to(dev)
            if bool(path.fixed.any()):
                fixed = path.fixed.to(dev)
                sampled[b] = torch.where(fixed, argmax[b], sampled[b])
                noise[b] = torch.where(fixed, argmax[b], noise[b])
                entropy[b] = entropy[b].masked_fill(fixed, 0.0)
            row.end, row.complete = int(path.states[-1]), path.complete
        return Step(sampled, argmax, entropy, noise)

    def repair(self, row: RowState, scores: ClassScores, path: CanvasPath, argmax: torch.Tensor) -> CanvasPath:
        """Steer the argmax canvas off what the verifier rejects: the rejected positions' classes are penalised
        and the DP re-run (a few rounds). A canvas still rejected may not end the output: its EOS and what
        follows become fill, so the output ends for length rather than invalid."""
        c = path.argmax.numel()
        aut = row.aut
        if not aut.check.prefixes and not bool((path.states == aut.done).any()) and \
                int(aut.dist[path.states[-1]]) > 1:
            return path  # only whole outputs are checked, and this canvas cannot end one: nothing to do
        bad = row.rejected(path.argmax)
        logp = None
        banned: dict[int, set[int]] = {}  # tokens the verifier rejected at each position
        for _ in range(REPAIR_ROUNDS):
            if bad is None or row.doomed:
                break
            tokens, rerun = path.argmax.clone(), False
            for j in bad.nonzero().flatten().tolist():
                banned.setdefault(j, set()).add(int(tokens[j]))
                # another token of the same class keeps the path (same edges): try that before a new path
                alt = _in_class(aut, scores, j, int(path.classes[j]), banned[j])
                if alt is None:
                    logp = scores.logp.clone() if logp is None else logp
                    logp[j, path.classes[j]] += PENALTY
                    rerun = True
                else:
                    tokens[j] = alt
            if rerun:
                path = best_canvas(ClassScores(logp, scores.ranking), aut, row.state, row.left(c),
                                   row.plan_for(c), argmax)
                tokens = path.argmax.clone()
                for j, ban in banned.items():  # rejected tokens stay out where their class has others
                    if int(tokens[j]) in ban:
                        alt = _in_class(aut, scores, j, int(path.classes[j]), ban)
                        tokens[j] = tokens[j] if alt is None else alt
            path = CanvasPath(tokens, path.classes, path.states, path.fixed, path.complete)
            bad = row.rejected(path.argmax)
        if bad is not None or row.doomed:
            ended = path.states[1:] == row.aut.done
            if bool(ended.any()):
                first = int(ended.nonzero()[0])
                argmax = path.argmax.clone()
                argmax[first:] = row.aut.fill_id
                classes = path.classes.clone()
                classes[first:] = row.aut.token_class[row.aut.fill_id]
                states = path.states.clone()
                states[first + 1:] = states[first]
                path = CanvasPath(argmax, classes, states, path.fixed, False)
        return path

    @property
    def verifier(self):
        """The rule check generate.stream runs on each step's samples (see generate.Verifier): positions whose
        token lies in a span a row's JSON-schema verifier rejects are re-noised. None when no row needs it."""
        rows = [(b, r) for b, r in enumerate(self.rows) if r is not None and r.aut.check is not None and
                r.aut.check.prefixes]
        if not rows:
            return None

        def check(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            reject = torch.zeros(tokens.shape, dtype=torch.bool)
            for b, row in rows:
                doomed = row.doomed
                bad = row.rejected(tokens[b].cpu())
                row.doomed = doomed  # a proposal does not doom a row; only its committed text does
                if bad is not None:
                    reject[b] = bad
            return reject.to(tokens.device) & positions

        return check

    def on_commit(self, ids: torch.Tensor, finished: torch.Tensor) -> None:
        for b, row in enumerate(self.rows):
            if row is not None and row.end is not None:
                if row.aut.check is not None:
                    lengths, _ = row.text_of(ids[b].cpu())
                    row.prefix += b"".join(row.aut.pieces[t] for t in ids[b, :len(lengths)].tolist())
                row.state, row.end, row.plan = row.end, None, None
                row.used += ids.shape[1]
