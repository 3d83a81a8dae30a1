"""The canvas DP: the most probable canvas that can still complete to an accepted output within the budget.

Given one denoising step's per-position distributions p_j over the vocabulary (the temperature-scaled softmax the
sampler drew from), the canvas that maximises prod_j p_j(x_j) over canvases x that are a path of the token
automaton from the current state, and that end where the rest of the output can still be finished in the tokens
left (so EOS, and the pad after it, land within max_tokens), is found by Viterbi over (position, state), as in
DINGO (constrained decoding for diffusion LLMs, 2025). Tokens of one class have the same edges, so the DP runs on
classes scored by their most probable token; the winning token of each chosen class is then read off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .automaton import INF, TokenAutomaton

LOG_FLOOR = -1e4  # log-probability of a token with zero mass: still a valid (terrible) choice, never -inf


@dataclass
class ClassScores:
    """Per position, each class's best token and its log-probability."""

    logp: torch.Tensor  # [C, K] float32, log of the class's largest probability
    best: torch.Tensor  # [C, K] int64, the token that has it


def class_scores(probs: torch.Tensor, aut: TokenAutomaton, k: int = 64, need: torch.Tensor | None = None) -> ClassScores:
    """probs [C, V] (any float dtype, rows sum to 1) -> the best token of every class at every position.

    Exact, without a pass over the whole vocabulary per class: small classes are gathered; a large class's best
    token at a position is its first member among the position's top-k tokens (sorted, so that is its maximum),
    and only positions where none of the top k is a member gather the class, and of those only the ones where
    `need` [C, K] (bool, see `needed_classes`) says a valid path could use it."""
    c, kk = probs.shape[0], aut.n_classes
    lay = aut.layout
    dev = probs.device
    maxp = torch.zeros(c, kk, dtype=torch.float32, device=dev)
    best = torch.zeros(c, kk, dtype=torch.int64, device=dev)
    if lay.small_tokens.numel():
        toks, cl = lay.small_tokens.to(dev), lay.small_class.to(dev)
        g = probs.index_select(1, toks).float()  # [C, n_small]
        idx = cl.expand(c, -1)
        maxp.scatter_reduce_(1, idx, g, "amax")
        hit = g == maxp.gather(1, idx)
        best.scatter_reduce_(1, idx, torch.where(hit, toks, -1), "amax")
    if lay.big:
        # the top k of each position, sorted: a large class's first member there is its best token
        vals, top = probs.topk(min(k, probs.shape[1]), dim=1)
        b = lay.big_index.to(dev)[aut.token_class.to(dev)[top]]  # [C, k]: large-class slot, -1 if none
        nb = lay.big_classes.numel()
        slot = torch.where(b >= 0, b, nb)
        big_max = torch.zeros(c, nb + 1, dtype=torch.float32, device=dev).scatter_reduce_(
            1, slot, vals.float(), "amax")
        first = torch.where(vals.float() == big_max.gather(1, slot), top, -1)
        big_best = torch.full((c, nb + 1), -1, dtype=torch.int64, device=dev).scatter_reduce_(1, slot, first, "amax")
        big_max, big_best = big_max[:, :nb], big_best[:, :nb]
        # (position, class) pairs the top k missed (and a valid path may use): gather those classes' members
        missed = big_best < 0
        if need is not None:
            missed &= need.to(dev)[:, lay.big_classes.to(dev)]
        for slot in missed.any(dim=0).nonzero().flatten().tolist():
            cls_id, members = lay.big[slot]
            rows = missed[:, slot].nonzero().flatten()
            members = members.to(dev)
            flat = (rows[:, None] * probs.shape[1] + members[None, :]).view(-1)
            m, a = probs.reshape(-1).index_select(0, flat).view(rows.numel(), -1).max(dim=1)
            big_max[rows, slot] = m.float()
            big_best[rows, slot] = members[a]
        cols = lay.big_classes.to(dev)
        maxp[:, cols] = big_max
        best[:, cols] = big_best.clamp(min=0)
    logp = torch.log(maxp).clamp_(min=LOG_FLOOR)
    return ClassScores(logp.cpu(), best.cpu())


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
    src_sorted = aut.src.numpy()[lay.by_dst]
    ok = allowed.numpy()
    r = np.zeros((c + 1, aut.n_states), dtype=bool)
    r[0, start] = ok[0, start]
    for j in range(c):
        if lay.dst_starts.size:
            r[j + 1, lay.has_in] = np.logical_or.reduceat(r[j, src_sorted], lay.dst_starts)
        r[j + 1] &= ok[j + 1]
    return torch.from_numpy(r)


def needed_classes(aut: TokenAutomaton, reach: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[C, K] bool: large classes on some edge a valid path could take at each position (small classes are always
    read, so their columns stay False)."""
    lay = aut.layout
    e = lay.big_edges
    need = torch.zeros(reach.shape[0] - 1, aut.n_classes, dtype=torch.int8)
    if e.numel():
        used = (reach[:-1][:, aut.src[e]] & allowed[1:][:, aut.dst[e]]).to(torch.int8)  # [C, E_large]
        need.scatter_reduce_(1, aut.cls[e].expand_as(used), used, "amax")
    return need.bool()


def solve(probs: torch.Tensor, aut: TokenAutomaton, start: int, left: torch.Tensor) -> CanvasPath:
    """`best_canvas` from the step's distributions [C, V], scoring only the classes a valid path could use."""
    c = probs.shape[0]
    allowed = allowed_states(aut, left, True)
    reach = reachable(aut, start, allowed)
    if not bool(reach[-1].any()):  # nothing finishes within the budget: best_canvas takes the prefix path
        m = min(c, int(left[0]))
        allowed = allowed_states(aut, left[:m + 1], False)
        reach = torch.cat([reachable(aut, start, allowed), torch.zeros(c - m, aut.n_states, dtype=torch.bool)])
        allowed = torch.cat([allowed, torch.zeros(c - m, aut.n_states, dtype=torch.bool)])
    return best_canvas(class_scores(probs, aut, need=needed_classes(aut, reach, allowed)), aut, start, left)


def viterbi(logp: torch.Tensor, aut: TokenAutomaton, start: int, allowed: torch.Tensor):
    """Best path of C edges from `start` staying in `allowed`: (classes [C], states [C + 1]) or None.
    Forward: best score per (boundary, state), vectorised over edges; backward: the best edge into each state."""
    c, s = logp.shape[0], aut.n_states
    lay = aut.layout
    srcn, clsn = aut.src.numpy(), aut.cls.numpy()
    ln = logp.numpy()[:, clsn]  # [C, E] edge scores
    ln_sorted = ln[:, lay.by_dst]
    src_sorted = srcn[lay.by_dst]
    blocked = ~allowed.numpy()
    vn = np.full((c + 1, s), -np.inf, dtype=np.float32)
    vn[0, start] = 0.0
    vn[0, blocked[0]] = -np.inf
    for j in range(c):  # the best score into each state: a max over its incoming edges (sorted by destination)
        if lay.dst_starts.size:
            vn[j + 1, lay.has_in] = np.maximum.reduceat(vn[j, src_sorted] + ln_sorted[j], lay.dst_starts)
        vn[j + 1, blocked[j + 1]] = -np.inf
    if not np.isfinite(vn[c]).any():
        return None
    in_edges = aut.layout.in_edges
    q = int(vn[c].argmax())
    states, classes = [q], []
    for j in range(c - 1, -1, -1):
        es = in_edges[q]
        e = es[int(np.argmax(vn[j, srcn[es]] + ln[j, es]))]
        classes.append(int(clsn[e]))
        q = int(srcn[e])
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


def best_canvas(scores: ClassScores, aut: TokenAutomaton, start: int, left: torch.Tensor) -> CanvasPath:
    """The most probable canvas that can still finish within the budget; when none can (the budget is shorter than
    any output), the most probable valid prefix over the budget's positions, then the fill token (no EOS: the
    output ends for length)."""
    c = scores.logp.shape[0]
    path = viterbi(scores.logp, aut, start, allowed_states(aut, left, True))
    if path is None:
        m = min(c, int(left[0]))
        path = viterbi(scores.logp[:m], aut, start, allowed_states(aut, left[:m + 1], False))
        if path is None:
            raise ValueError("the constraint admits no continuation from this state")  # excluded by compile
        classes, states = path
        fill_class = aut.token_class[aut.fill_id]
        classes = torch.cat([classes, fill_class.expand(c - m)])
        states = torch.cat([states, states[-1:].expand(c - m)])
        tokens = torch.cat([scores.best[torch.arange(m), classes[:m]], torch.full((c - m,), aut.fill_id)])
        fixed = torch.cat([aut.fixed_dst[states[1:m + 1]], torch.zeros(c - m, dtype=torch.bool)])
        return CanvasPath(tokens, classes, states, fixed, False)
    classes, states = path
    return CanvasPath(scores.best[torch.arange(c), classes], classes, states, aut.fixed_dst[states[1:]], True)


def draw_in_class(proposal: torch.Tensor, path: CanvasPath, aut: TokenAutomaton) -> torch.Tensor:
    """Sampled tokens that keep the canvas valid: the sampler's own draw where it lies in the argmax path's class
    at that position (tokens of one class have the same edges, so the path stays valid; given that it landed
    there, it is a draw from p_j restricted to the class), else the class's most probable token."""
    inside = aut.token_class[proposal.cpu()] == path.classes
    return torch.where(inside, proposal.cpu(), path.argmax)
