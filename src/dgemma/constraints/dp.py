"""The canvas DP: the most probable canvas that can still complete to an accepted output within the budget.

Given one denoising step's per-position distributions p_j over the vocabulary (the temperature-scaled softmax the
sampler drew from), the canvas that maximises prod_j p_j(x_j) over canvases x that are a path of the token
automaton from the current state, and that end where the rest of the output can still be finished in the tokens
left (so EOS, and the pad after it, land within max_tokens), is found by Viterbi over (position, state), as in
DINGO (constrained decoding for diffusion LLMs, 2025). Tokens of one class have the same edges, so the DP runs on
classes scored by their most probable token; the winning token of each chosen class is then read off.
The class scores are taken inside the sampler's own pass over the vocabulary (`ClassScorer`), and what depends only
on the state and the budget is planned once per canvas (`plan_canvas`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..sampler import chunk_rows
from .automaton import INF, TokenAutomaton

LOG_FLOOR = -1e4  # log-probability of a token with zero mass: still a valid (terrible) choice, never -inf


def class_max(q: torch.Tensor, lay, use_numpy: bool) -> torch.Tensor:
    """[n, V_live] fp32 probabilities in class order -> [n, K] (on CPU): each class's maximum. numpy's reduceat on
    CPU (~3x faster than scatter_reduce there), scatter_reduce on accelerators."""
    if use_numpy:
        return torch.from_numpy(np.maximum.reduceat(q.cpu().numpy(), lay.class_starts, axis=1))
    idx = lay.on("class_of_order", q.device).expand_as(q)
    return q.new_zeros(q.shape[0], lay.class_starts.size).scatter_reduce_(1, idx, q, "amax").cpu()


class ClassScorer:
    """Each class's largest probability at every canvas position, filled chunk by chunk.

    The sampler's fused pass (`fast_sample(visit=...)`) hands it each chunk of a row's fp32 distribution while the
    chunk is in cache, so scoring reads no [C, V] tensor from memory again. With the live tokens sorted by class
    every class is a contiguous run: one gather and one segmented max (numpy `reduceat`) give every class's exact
    maximum in about two passes over the chunk, whatever the class sizes."""

    def __init__(self, aut: TokenAutomaton, canvas: int):
        self.aut = aut
        self.canvas = canvas
        self.by_class = torch.zeros(canvas, aut.n_classes, dtype=torch.float32)
        self.grouped: np.ndarray | None = None  # the CPU path's: the other classes' columns, then the big ones
        self.bufs: dict[str, torch.Tensor] = {}  # CPU temporaries, reused from chunk to chunk

    @property
    def maxp(self) -> torch.Tensor:
        """[C, K] each class's largest probability at each position."""
        if self.grouped is None:
            return self.by_class
        lay = self.aut.layout
        return torch.from_numpy(self.grouped[:, np.argsort(np.r_[lay.rest_cls, lay.big])])

    def _buf(self, name: str, n: int, width: int) -> torch.Tensor:
        b = self.bufs.get(name)
        if b is None or b.shape[0] < n:
            b = self.bufs[name] = torch.empty(n, width, dtype=torch.float32)
        return b[:n]

    def __call__(self, start: int, probs: torch.Tensor) -> None:
        """probs [n, V] (any float dtype): the distributions at positions start .. start + n - 1."""
        lay = self.aut.layout
        step = chunk_rows(probs.shape[1], probs.device)
        if probs.device.type == "cpu" and probs.dtype == torch.float32:
            self._cpu(start, probs, lay, step)
            return
        order = lay.on("order", probs.device)
        for s in range(0, probs.shape[0], step):
            q = probs[s:s + step].index_select(1, order).float()  # [n, V_live], classes contiguous
            self.by_class[start + s:start + s + q.shape[0]] = class_max(q, lay, q.device.type == "cpu")

    def _cpu(self, start: int, probs: torch.Tensor, lay, step: int) -> None:
        """The sampler's fp32 chunks on CPU: a big class's max is the row max of probs times its 0/1 mask (exact:
        probabilities are >= 0; two streaming passes instead of a gather of most of the row); the other classes'
        tokens are gathered into a reused buffer and their segmented max is written in place."""
        if self.grouped is None:
            self.grouped = np.zeros((self.canvas, self.aut.n_classes), dtype=np.float32)
        n_rest = lay.rest_cls.size
        for s in range(0, probs.shape[0], step):
            chunk = probs[s:s + step]
            n = chunk.shape[0]
            rows = self.grouped[start + s:start + s + n]
            if n_rest:
                q = self._buf("rest", n, lay.rest_order.numel())
                torch.index_select(chunk, 1, lay.rest_order, out=q)  # [n, tokens], classes contiguous
                np.maximum.reduceat(q.numpy(), lay.rest_starts, axis=1, out=rows[:, :n_rest])
            for i in range(lay.big.size):
                masked = self._buf("masked", n, chunk.shape[1])
                torch.mul(chunk, lay.big_mask[i], out=masked)
                rows[:, n_rest + i] = masked.amax(dim=1).numpy()

    def scores(self, ranking: torch.Tensor | None) -> ClassScores:
        return ClassScores(torch.log(self.maxp).clamp_(min=LOG_FLOOR), ranking)


@dataclass
class ClassScores:
    """Per position, the log of each class's largest probability, and where to read the token that has it."""

    logp: torch.Tensor  # [C, K] float32
    ranking: torch.Tensor | None  # [C, V] ordered like the probabilities (probs or logits); None: first members

    def best(self, aut: TokenAutomaton, classes: torch.Tensor, argmax: torch.Tensor | None = None) -> torch.Tensor:
        """The most probable token of `classes[j]` at each position j (the lowest id among ties). `argmax` [C]: the
        unconstrained argmax, already the answer wherever it lies in the chosen class."""
        first = aut.order[aut.offsets[classes]]
        if self.ranking is None:
            return first
        out = first.clone()
        dev = self.ranking.device
        done = torch.zeros_like(classes, dtype=torch.bool)
        if argmax is not None:
            argmax = argmax[:classes.numel()].cpu()
            done = aut.token_class[argmax] == classes
            out[done] = argmax[done]
        big = aut.layout.big.tolist()
        for k in classes[~done].unique().tolist():
            members = aut.order[aut.offsets[k]:aut.offsets[k + 1]]
            if members.numel() == 1:
                continue
            pos = ((classes == k) & ~done).nonzero().flatten()
            rows = self.ranking.index_select(0, pos.to(dev))
            if k in big:  # most of the vocabulary: mask the others out of the whole rows instead of gathering
                mask = aut.layout.on("big_bool", dev)[big.index(k)]
                best = _first_argmax(rows.to(torch.float32, copy=True).masked_fill_(~mask, float("-inf")))
                if bool((aut.token_class[best] == k).all()):  # (a member at -inf would tie with the others)
                    out[pos] = best
                    continue
            out[pos] = members[_first_argmax(rows.index_select(1, members.to(dev)))]  # members sorted: lowest id
        return out


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """[n, m] -> [n] on CPU: each row's index of its first maximum (numpy's argmax on CPU: several times faster than
    torch's, in fp32, which holds bf16 / fp16 values exactly)."""
    if x.device.type != "cpu":
        return x.argmax(dim=1).cpu()
    return torch.from_numpy(x.float().numpy().argmax(axis=1))


def class_scores(probs: torch.Tensor, aut: TokenAutomaton) -> ClassScores:
    """probs [C, V] (any float dtype, rows sum to 1) -> each class's score at every position (in one go; the
    sampler's pass feeds a `ClassScorer` chunk by chunk instead)."""
    scorer = ClassScorer(aut, probs.shape[0])
    scorer(0, probs)
    return scorer.scores(probs)


def allowed_states(aut: TokenAutomaton, left: torch.Tensor, complete: bool) -> torch.Tensor:
    """[C + 1, S] bool: states the path may be in at each canvas boundary. `left[j]`: tokens of the budget still
    unused at boundary j. complete=True: only states that can still finish (EOS included) within `left`;
    False (the budget is too short to finish at all): any state that is a valid prefix, DONE excluded."""
    if complete:
        return aut.dist[None, :] <= left[:, None]
    ok = (aut.dist < INF).clone()
    ok[aut.done] = False
    return ok[None, :].expand(left.numel(), -1)


def reachable(aut: TokenAutomaton, start: int, allowed: torch.Tensor) -> torch.Tensor:
    """[C + 1, S] bool: states some path from `start` can be in at each boundary while staying in `allowed`.
    (numpy on small arrays: these per-position loops are latency-bound, and torch ops on a busy multi-threaded
    CPU cost far more than their arithmetic.)"""
    c = allowed.shape[0] - 1
    lay = aut.layout
    ok = allowed.numpy()[:, np.argsort(lay.compact)]  # compact state numbering, as in `viterbi`
    r = np.zeros((c + 1, aut.n_states), dtype=bool)
    r[0, lay.compact[start]] = ok[0, lay.compact[start]]
    n_in = lay.dst_starts.size
    buf = np.empty(lay.pair_csrc.size, dtype=bool)
    for j in range(c):
        if n_in:
            np.take(r[j], lay.pair_csrc, out=buf)
            np.logical_or.reduceat(buf, lay.dst_starts, out=r[j + 1, :n_in])
        np.logical_and(r[j + 1], ok[j + 1], out=r[j + 1])
    return torch.from_numpy(r[:, lay.compact])


@dataclass
class CanvasPlan:
    """What a row's DP needs that stays the same for every step of one canvas (it depends only on the state the
    committed text left and the budget): computed once per canvas."""

    allowed: torch.Tensor  # [length + 1, S] states the path may be in at each boundary
    length: int  # positions the path covers: C, or the budget's positions when nothing can finish
    complete: bool  # False: no output fits the budget; the path is the best valid prefix (no EOS), then fill
    penalty: np.ndarray | None = None  # [length, P] the Viterbi's pair penalties (`pair_penalty`), made once

    def pair_penalty(self, aut: TokenAutomaton) -> np.ndarray:
        if self.penalty is None:
            self.penalty = pair_penalty(aut, self.allowed, self.length)
        return self.penalty


def plan_canvas(aut: TokenAutomaton, start: int, left: torch.Tensor) -> CanvasPlan:
    c = left.numel() - 1
    allowed = allowed_states(aut, left, True)
    if bool(reachable(aut, start, allowed)[-1].any()):
        return CanvasPlan(allowed, c, True)
    m = min(c, int(left[0]))
    return CanvasPlan(allowed_states(aut, left[:m + 1], False), m, False)


def pair_scores(logp: np.ndarray, lay) -> np.ndarray:
    """[C, K] class scores -> [C, P]: each pair's best class (the max over each distinct class set once: a
    column for a set of one class, index_reduce for the others, ~10x faster than numpy's reduceat here)."""
    sets = np.empty((logp.shape[0], lay.n_sets), dtype=np.float32)
    sets[:, lay.single_sets] = logp[:, lay.single_cls]
    if lay.multi_sets.size:
        out = torch.empty(lay.multi_sets.size, logp.shape[0], dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "index_reduce() is in beta"
            out.index_reduce_(0, lay.multi_of, torch.from_numpy(np.ascontiguousarray(logp.T[lay.multi_cls])),
                              "amax", include_self=False)
        sets[:, lay.multi_sets] = out.numpy().T
    return sets[:, lay.pair_set]


def pair_penalty(aut: TokenAutomaton, allowed: torch.Tensor, c: int) -> np.ndarray:
    """[c, P] float32: -inf for a pair at position j whose destination is not allowed at boundary j + 1, else 0
    (added to the pair scores, it keeps the forward pass out of states that are not allowed)."""
    ok = allowed.numpy()[1:c + 1, aut.layout.pair_dst]
    return np.where(ok, np.float32(0.0), np.float32(-np.inf))


def viterbi(logp: torch.Tensor, aut: TokenAutomaton, start: int, allowed: torch.Tensor,
            penalty: np.ndarray | None = None):
    """Best path of C edges from `start` staying in `allowed`: (classes [C], states [C + 1]) or None.
    Forward over state pairs: a pair's score is its best class's (for all positions at once, `pair_scores`), with
    -inf where its destination is not allowed (`penalty`: `pair_penalty`, made once per canvas), a state's score
    the max over its incoming pairs (sorted by destination: one gather and one `reduceat` per position, written
    straight into the states' compact row); backward: the best pair into each state of the path, then that pair's
    best class (the lowest class among equal scores, as the classes of a pair are sorted)."""
    c, s = logp.shape[0], aut.n_states
    lay = aut.layout
    lp = logp.numpy()
    pscore = pair_scores(lp, lay)
    pscore += pair_penalty(aut, allowed, c) if penalty is None else penalty
    vc = np.full((c + 1, s), -np.inf, dtype=np.float32)  # compact state numbering (Layout.compact)
    if allowed.numpy()[0, start]:
        vc[0, lay.compact[start]] = 0.0
    n_in = lay.dst_starts.size
    if n_in:
        buf = np.empty(pscore.shape[1], dtype=np.float32)
        csrc, starts_in = lay.pair_csrc, lay.dst_starts
        for j in range(c):
            np.take(vc[j], csrc, out=buf)
            buf += pscore[j]
            np.maximum.reduceat(buf, starts_in, out=vc[j + 1, :n_in])
    last = vc[c, lay.compact]  # back in state order: the first best state, as before
    if not np.isfinite(last).any():
        return None
    q = int(last.argmax())
    states, classes = [q], []
    bounds, src, starts, edge_cls = lay.lists  # Python ints: this loop is all scalar lookups
    csrc = lay.pair_csrc
    for j in range(c - 1, -1, -1):
        a, b = bounds[q], bounds[q + 1]
        p = a + int(np.argmax(vc[j, csrc[a:b]] + pscore[j, a:b])) if b - a > 1 else a
        e0, e1 = starts[p], starts[p + 1]
        k = edge_cls[e0]
        if e1 - e0 > 1:
            ks = lay.edge_cls[e0:e1]
            k = int(ks[np.argmax(lp[j, ks])])
        classes.append(k)
        q = src[p]
        states.append(q)
    return torch.tensor(classes[::-1], dtype=torch.int64), torch.tensor(states[::-1], dtype=torch.int64)


@dataclass
class CanvasPath:
    """The DP's answer for one row and step (each [C] unless noted)."""

    argmax: torch.Tensor  # the most probable valid canvas
    classes: torch.Tensor
    states: torch.Tensor  # [C + 1] the automaton path of `argmax`
    fixed: torch.Tensor  # bool: positions holding a template's fixed token
    complete: bool  # False: no output fits the budget; the path is the best valid prefix (no EOS)


def best_canvas(scores: ClassScores, aut: TokenAutomaton, start: int, left: torch.Tensor,
                plan: CanvasPlan | None = None, argmax: torch.Tensor | None = None) -> CanvasPath:
    """The most probable canvas that can still finish within the budget; when none can (the budget is shorter than
    any output), the most probable valid prefix over the budget's positions, then the fill token (no EOS: the
    output ends for length). `plan`: `plan_canvas(aut, start, left)`, when the caller keeps it for the canvas;
    `argmax` [C]: the step's unconstrained argmax (saves reading the best token of classes that contain it)."""
    c = scores.logp.shape[0]
    plan = plan or plan_canvas(aut, start, left)
    path = viterbi(scores.logp[:plan.length], aut, start, plan.allowed, plan.pair_penalty(aut))
    if path is None:
        raise ValueError("the constraint admits no continuation from this state")  # excluded by compile
    classes, states = path
    tokens = scores.best(aut, classes, argmax)
    fixed = aut.fixed_dst[states[1:]]
    if not plan.complete:
        pad = c - plan.length
        classes = torch.cat([classes, aut.token_class[aut.fill_id].expand(pad)])
        states = torch.cat([states, states[-1:].expand(pad)])
        tokens = torch.cat([tokens, torch.full((pad,), aut.fill_id)])
        fixed = torch.cat([fixed, torch.zeros(pad, dtype=torch.bool)])
    return CanvasPath(tokens, classes, states, fixed, plan.complete)


def draw_in_class(proposal: torch.Tensor, path: CanvasPath, aut: TokenAutomaton) -> torch.Tensor:
    """Sampled tokens that keep the canvas valid: the sampler's own draw where it lies in the argmax path's class
    at that position (tokens of one class have the same edges, so the path stays valid; given that it landed
    there, it is a draw from p_j restricted to the class), else the class's most probable token."""
    inside = aut.token_class[proposal.cpu()] == path.classes
    return torch.where(inside, proposal.cpu(), path.argmax)
