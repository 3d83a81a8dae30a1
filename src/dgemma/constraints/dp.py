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


def class_scores(probs: torch.Tensor, aut: TokenAutomaton, k: int = 16, need: torch.Tensor | None = None) -> ClassScores:
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
        vals, top = probs.topk(min(k, probs.shape[1]), dim=1)
        top_cls = aut.token_class.to(dev)[top]
        for cls_id, members in lay.big:
            hit = top_cls == cls_id
            has = hit.any(dim=1)
            first = hit.int().argmax(dim=1, keepdim=True)  # the first (largest) member in the top k
            maxp[:, cls_id] = torch.where(has, vals.gather(1, first).squeeze(1).float(), 0.0)
            best[:, cls_id] = top.gather(1, first).squeeze(1)
            miss = (~has if need is None else ~has & need[:, cls_id].to(dev)).nonzero().flatten()
            if miss.numel():
                flat = (miss[:, None] * probs.shape[1] + members.to(dev)[None, :]).view(-1)
                g = probs.reshape(-1).index_select(0, flat).view(miss.numel(), -1)  # only what is needed
                m, a = g.max(dim=1)
                maxp[miss, cls_id] = m.float()
                best[miss, cls_id] = members.to(dev)[a]
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
    """[C + 1, S] bool: states some path from `start` can be in at each boundary while staying in `allowed`."""
    c = allowed.shape[0] - 1
    adj = aut.layout.adjacency  # [S, S] float, 1 where an edge s -> d exists
    r = torch.zeros(c + 1, aut.n_states, dtype=torch.bool)
    r[0, start] = bool(allowed[0, start])
    for j in range(c):
        r[j + 1] = (r[j].to(adj.dtype) @ adj > 0) & allowed[j + 1]
    return r


def needed_classes(aut: TokenAutomaton, reach: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """[C, K] bool: classes on some edge a valid path could take at each position."""
    used = (reach[:-1][:, aut.src] & allowed[1:][:, aut.dst]).to(torch.int8)  # [C, E]
    need = torch.zeros(used.shape[0], aut.n_classes, dtype=torch.int8)
    return need.scatter_reduce_(1, aut.cls.expand_as(used), used, "amax").bool()


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
    src, dst = aut.src, aut.dst
    edge_logp = logp[:, aut.cls]  # [C, E]
    v = torch.empty(c + 1, s)
    v[0] = -torch.inf
    v[0, start] = 0.0
    v[0].masked_fill_(~allowed[0], -torch.inf)
    for j in range(c):
        cand = v[j].index_select(0, src).add_(edge_logp[j])
        v[j + 1] = torch.full((s,), -torch.inf).scatter_reduce_(0, dst, cand, "amax").masked_fill_(
            ~allowed[j + 1], -torch.inf)
    if not bool(torch.isfinite(v[c]).any()):
        return None
    vn, ln = v.numpy(), edge_logp.numpy()
    srcn, clsn = src.numpy(), aut.cls.numpy()
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
    complete = path is not None
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
        return CanvasPath(tokens, classes, states, torch.zeros(c, dtype=torch.bool), False)
    classes, states = path
    return CanvasPath(scores.best[torch.arange(c), classes], classes, states, aut.fixed_dst[states[1:]], True)


def draw_in_class(proposal: torch.Tensor, path: CanvasPath, aut: TokenAutomaton) -> torch.Tensor:
    """Sampled tokens that keep the canvas valid: the sampler's own draw where it lies in the argmax path's class
    at that position (tokens of one class have the same edges, so the path stays valid; given that it landed
    there, it is a draw from p_j restricted to the class), else the class's most probable token."""
    inside = aut.token_class[proposal.cpu()] == path.classes
    return torch.where(inside, proposal.cpu(), path.argmax)
