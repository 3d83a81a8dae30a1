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
        self.maxp = torch.zeros(canvas, aut.n_classes, dtype=torch.float32)

    def __call__(self, start: int, probs: torch.Tensor) -> None:
        """probs [n, V] (any float dtype): the distributions at positions start .. start + n - 1."""
        lay = self.aut.layout
        step = chunk_rows(probs.shape[1], probs.device)
        order = lay.on("order", probs.device)
        for s in range(0, probs.shape[0], step):
            q = probs[s:s + step].index_select(1, order).float()  # [n, V_live], classes contiguous
            self.maxp[start + s:start + s + q.shape[0]] = class_max(q, lay, q.device.type == "cpu")

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
        for k in classes[~done].unique().tolist():
            members = aut.order[aut.offsets[k]:aut.offsets[k + 1]]
            if members.numel() == 1:
                continue
            pos = ((classes == k) & ~done).nonzero().flatten()
            vals = self.ranking.index_select(0, pos.to(dev)).index_select(1, members.to(dev))
            out[pos] = members[vals.argmax(dim=1).cpu()]  # members are sorted: argmax takes the lowest id
        return out


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
    ok = allowed.numpy()
    r = np.zeros((c + 1, aut.n_states), dtype=bool)
    r[0, start] = ok[0, start]
    for j in range(c):
        if lay.dst_starts.size:
            r[j + 1, lay.has_in] = np.logical_or.reduceat(r[j, lay.pair_src], lay.dst_starts)
        r[j + 1] &= ok[j + 1]
    return torch.from_numpy(r)


@dataclass
class CanvasPlan:
    """What a row's DP needs that stays the same for every step of one canvas (it depends only on the state the
    committed text left and the budget): computed once per canvas."""

    allowed: torch.Tensor  # [length + 1, S] states the path may be in at each boundary
    length: int  # positions the path covers: C, or the budget's positions when nothing can finish
    complete: bool  # False: no output fits the budget; the path is the best valid prefix (no EOS), then fill


def plan_canvas(aut: TokenAutomaton, start: int, left: torch.Tensor) -> CanvasPlan:
    c = left.numel() - 1
    allowed = allowed_states(aut, left, True)
    if bool(reachable(aut, start, allowed)[-1].any()):
        return CanvasPlan(allowed, c, True)
    m = min(c, int(left[0]))
    return CanvasPlan(allowed_states(aut, left[:m + 1], False), m, False)


def _pair_max(edge_scores: torch.Tensor, lay) -> torch.Tensor:
    """[E, C] edge scores -> [P, C]: each pair's best edge (a segmented max over rows; index_reduce is ~10x faster
    than numpy's reduceat here)."""
    out = torch.empty(lay.pair_src.size, edge_scores.shape[1], dtype=edge_scores.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "index_reduce() is in beta"
        return out.index_reduce_(0, lay.on("pair_of_edge", torch.device("cpu")), edge_scores, "amax",
                                 include_self=False)


def viterbi(logp: torch.Tensor, aut: TokenAutomaton, start: int, allowed: torch.Tensor):
    """Best path of C edges from `start` staying in `allowed`: (classes [C], states [C + 1]) or None.
    Forward over state pairs: a pair's score is its best edge's (for all positions in one call), a state's score
    the max over its incoming pairs (sorted by destination: one gather and one `reduceat` per position); backward:
    the best pair into each state of the path, then that pair's best edge."""
    c, s = logp.shape[0], aut.n_states
    lay = aut.layout
    ln = np.ascontiguousarray(logp.numpy().T)[lay.edge_cls]  # [E, C] edge scores, each pair's edges contiguous
    pscore = _pair_max(torch.from_numpy(ln), lay).T.contiguous().numpy()  # [C, P]
    blocked = ~allowed.numpy()
    vn = np.full((c + 1, s), -np.inf, dtype=np.float32)
    vn[0, start] = 0.0
    vn[0, blocked[0]] = -np.inf
    buf = np.empty(pscore.shape[1], dtype=np.float32)
    for j in range(c):
        if lay.dst_starts.size:
            np.take(vn[j], lay.pair_src, out=buf)
            buf += pscore[j]
            vn[j + 1, lay.has_in] = np.maximum.reduceat(buf, lay.dst_starts)
        vn[j + 1, blocked[j + 1]] = -np.inf
    if not np.isfinite(vn[c]).any():
        return None
    q = int(vn[c].argmax())
    states, classes = [q], []
    bounds, src, starts, edge_cls = lay.lists  # Python ints: this loop is all scalar lookups
    for j in range(c - 1, -1, -1):
        a, b = bounds[q], bounds[q + 1]
        p = a + int(np.argmax(vn[j, lay.pair_src[a:b]] + pscore[j, a:b])) if b - a > 1 else a
        e0, e1 = starts[p], starts[p + 1]
        e = e0 + int(np.argmax(ln[e0:e1, j])) if e1 - e0 > 1 else e0
        classes.append(edge_cls[e])
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
    path = viterbi(scores.logp[:plan.length], aut, start, plan.allowed)
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
