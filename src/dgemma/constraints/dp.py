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

import torch

from .automaton import INF, TokenAutomaton

LOG_FLOOR = -1e4  # log-probability of a token with zero mass: still a valid (terrible) choice, never -inf


@dataclass
class ClassScores:
    """Per position, each class's best token and its log-probability."""

    logp: torch.Tensor  # [C, K] float32, log of the class's largest probability
    best: torch.Tensor  # [C, K] int64, the token that has it


def class_scores(probs: torch.Tensor, aut: TokenAutomaton) -> ClassScores:
    """probs [C, V] (any float dtype, rows sum to 1) -> the best token of every class at every position.

    Only tokens that lie on some edge are read (`order`), chunked so temporaries stay small at V = 262144."""
    c = probs.shape[0]
    k = aut.n_classes
    logp = torch.empty(c, k, dtype=torch.float32)
    best = torch.empty(c, k, dtype=torch.int64)
    order = aut.order.to(probs.device)
    lengths = (aut.offsets[1:] - aut.offsets[:-1]).to(probs.device)
    seg = torch.repeat_interleave(torch.arange(k, device=probs.device), lengths)  # class of each order entry
    step = max(1, (1 << 21) // max(order.numel(), 1))
    for s in range(0, c, step):
        p = probs[s:s + step].index_select(1, order).float()  # [c', V_live], tokens grouped by class
        lens = lengths.expand(p.shape[0], -1)
        m = torch.segment_reduce(p, "max", lengths=lens, axis=1)  # [c', K]
        # the first token of each class whose probability equals the class maximum
        hit = p == m.index_select(1, seg)
        pos = torch.arange(order.numel(), device=p.device).expand_as(p)
        first = torch.where(hit, pos, order.numel()).to(torch.float32)
        idx = torch.segment_reduce(first, "min", lengths=lens, axis=1).long()
        best[s:s + step] = order[idx.clamp_(max=order.numel() - 1)].cpu()
        logp[s:s + step] = torch.log(m).clamp_(min=LOG_FLOOR).cpu()
    return ClassScores(logp, best)


def allowed_states(aut: TokenAutomaton, left: torch.Tensor, complete: bool) -> torch.Tensor:
    """[C + 1, S] bool: states the path may be in at each canvas boundary. `left[j]`: tokens of the budget still
    unused at boundary j. complete=True: only states that can still finish (EOS included) within `left`;
    False (the budget is too short to finish at all): any state that is a valid prefix, DONE excluded."""
    if complete:
        return aut.dist[None, :] <= left[:, None]
    ok = (aut.dist < INF).clone()
    ok[aut.done] = False
    return ok[None, :].expand(left.numel(), -1)


def viterbi(logp: torch.Tensor, aut: TokenAutomaton, start: int, allowed: torch.Tensor):
    """Best path of C edges from `start` staying in `allowed`: (classes [C], states [C + 1]) or None."""
    c = logp.shape[0]
    s = aut.n_states
    src, cls, dst = aut.src, aut.cls, aut.dst
    edge_ids = torch.arange(src.numel())
    v = torch.full((s,), -torch.inf)
    v[start] = 0.0
    v = v.masked_fill(~allowed[0], -torch.inf)
    back = torch.empty(c, s, dtype=torch.int64)
    for j in range(c):
        cand = v[src] + logp[j, cls]
        nv = torch.full((s,), -torch.inf).scatter_reduce_(0, dst, cand, "amax")
        nv.masked_fill_(~allowed[j + 1], -torch.inf)
        win = (cand == nv[dst]) & (cand > -torch.inf)
        back[j] = torch.full((s,), -1, dtype=torch.int64).scatter_reduce_(0, dst[win], edge_ids[win], "amax")
        v = nv
    if not bool(torch.isfinite(v).any()):
        return None
    q = int(v.argmax())
    states = [q]
    classes = []
    for j in range(c - 1, -1, -1):
        e = int(back[j, q])
        classes.append(int(cls[e]))
        q = int(src[e])
        states.append(q)
    return torch.tensor(classes[::-1]), torch.tensor(states[::-1])


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


def draw_in_class(probs: torch.Tensor, proposal: torch.Tensor, path: CanvasPath, aut: TokenAutomaton,
                  generator: torch.Generator) -> torch.Tensor:
    """Sampled tokens that follow the argmax path's classes (so the canvas stays valid: tokens of one class have
    the same edges): the sampler's own draw where it lies in the path's class (then it is exactly a draw from p_j
    restricted to that class), otherwise a fresh draw from p_j restricted to the class."""
    out = proposal.clone()
    inside = aut.token_class[proposal.cpu()] == path.classes
    redo = (~inside).nonzero().flatten().tolist()
    for j in redo:
        k = int(path.classes[j])
        members = aut.order[aut.offsets[k]:aut.offsets[k + 1]]
        if members.numel() == 1:
            out[j] = members[0]
            continue
        w = probs[j].index_select(0, members.to(probs.device)).float().cpu()
        if not bool(w.sum() > 0):
            out[j] = path.argmax[j]
            continue
        out[j] = members[torch.multinomial(w, 1, generator=generator)]
    return out
