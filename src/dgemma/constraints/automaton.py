"""Token automata: states and transitions over the model's vocabulary, with tokens grouped into classes.

A constraint (regex, JSON schema, choice, infill template) becomes a set of token-level edges (state, token, next
state) with a start state and accepting states. `TokenAutomaton.build` appends the end: EOS from an accepting state
to a DONE state that only emits the filler (pad) token, drops every state that cannot lie on an accepting path,
and groups tokens that have exactly the same edges into classes. A canvas DP then works on (state, class, state)
edges, whose number stays small even at V = 262144 (inside a JSON string, tens of thousands of tokens behave alike).
The automaton may be nondeterministic (infill templates are); the DP follows one path and keeps its state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

INF = 1 << 30  # distance of states that cannot reach DONE
BIG_CLASS = 4096  # a class of at least this many tokens and a quarter of the live ones is scored by a masked max


def _mix64(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of uint64 values (wrapping arithmetic): a random-looking 64-bit hash per value."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _distances(n: int, a: np.ndarray, b: np.ndarray, target: int) -> np.ndarray:
    """Shortest number of edges from every state to `target` along state-graph edges a -> b (INF: none)."""
    dist = np.full(n, INF, dtype=np.int64)
    dist[target] = 0
    while True:  # Bellman-Ford with unit weights: at most (longest shortest path) rounds
        new = dist.copy()
        np.minimum.at(new, a, dist[b] + 1)
        new = np.minimum(new, INF)
        if np.array_equal(new, dist):
            return dist
        dist = new


@dataclass
class TokenAutomaton:
    n_states: int  # including DONE
    start: int
    done: int
    vocab_size: int
    token_class: torch.Tensor  # [V] int64: the class of each token, -1 for tokens on no edge
    order: torch.Tensor  # [V_live] tokens sorted by class; class k is order[offsets[k]:offsets[k + 1]]
    offsets: torch.Tensor  # [K + 1]
    src: torch.Tensor  # [E] class-level edges: src --cls--> dst
    cls: torch.Tensor
    dst: torch.Tensor
    dist: torch.Tensor  # [S] tokens from each state to DONE (EOS included); INF where DONE is out of reach
    fixed_dst: torch.Tensor  # [S] bool: an edge into this state places a fixed (template) token
    fill_id: int  # the token after EOS (pad), also written past the budget
    # A JSON schema's verifier (verify.SchemaCheck) and what it needs to decode a canvas: each token's bytes
    # (None for special tokens) and the EOS ids. None for constraints the automaton holds alone.
    check: object = None
    pieces: tuple | None = None
    eos_ids: tuple = ()

    @functools.cached_property
    def layout(self) -> Layout:
        return Layout.of(self)

    @property
    def n_classes(self) -> int:
        return self.offsets.numel() - 1

    @property
    def min_tokens(self) -> int:
        """The fewest tokens of any accepted output, its EOS included."""
        return int(self.dist[self.start])

    @classmethod
    def build(cls, src, tok, dst, n_states: int, start: int, finals, vocab_size: int, eos_ids, fill_id: int,
              fixed_dst=None) -> TokenAutomaton:
        src, tok, dst = (np.asarray(x, dtype=np.int64) for x in (src, tok, dst))
        done = n_states
        finals = np.asarray(sorted(set(finals)), dtype=np.int64)
        eos = np.asarray(sorted(set(eos_ids)), dtype=np.int64)
        src = np.concatenate([src, np.repeat(finals, len(eos)), [done]])
        tok = np.concatenate([tok, np.tile(eos, len(finals)), [fill_id]])
        dst = np.concatenate([dst, np.full(len(finals) * len(eos), done), [done]])
        n = n_states + 1
        # keep only edges on some accepting path: src reachable from start, dst reaches DONE
        pairs = np.unique(src * n + dst)
        a, b = pairs // n, pairs % n
        dist = _distances(n, a, b, done)
        reach = _distances(n, b, a, start) < INF  # reversed graph: reachable from start
        keep = reach[src] & (dist[dst] < INF)
        src, tok, dst = src[keep], tok[keep], dst[keep]
        # a token's class is the set of (src, dst) pairs it labels, compared by two independent 64-bit hashes
        key = (src * n + dst).astype(np.uint64)
        h1, h2 = _mix64(key, 1), _mix64(key, 2)
        by_tok = np.argsort(tok, kind="stable")
        tok_sorted = tok[by_tok]
        starts = np.flatnonzero(np.r_[True, tok_sorted[1:] != tok_sorted[:-1]]) if len(tok) else np.zeros(0, np.int64)
        with np.errstate(over="ignore"):
            s1 = np.add.reduceat(h1[by_tok], starts) if len(tok) else h1
            s2 = np.add.reduceat(h2[by_tok], starts) if len(tok) else h2
        live_tokens = tok_sorted[starts]
        sig = np.stack([s1, s2], axis=1)
        _, first, klass = np.unique(sig, axis=0, return_index=True, return_inverse=True)
        klass = klass.reshape(-1)
        # number classes in order of their smallest token, so the numbering does not depend on hash values
        rank = np.argsort(np.argsort(live_tokens[first], kind="stable"), kind="stable")
        klass = rank[klass]
        token_class = np.full(vocab_size, -1, dtype=np.int64)
        token_class[live_tokens] = klass
        edges = np.unique(np.stack([src, token_class[tok], dst], axis=1), axis=0)
        order = np.lexsort((live_tokens, klass))
        sizes = np.bincount(klass, minlength=len(first))
        fixed = np.zeros(n, dtype=bool)
        if fixed_dst is not None:
            fixed[np.asarray(list(fixed_dst), dtype=np.int64)] = True
        t = torch.from_numpy
        return cls(n, start, done, vocab_size, t(token_class), t(live_tokens[order].copy()),
                   t(np.r_[0, np.cumsum(sizes)].astype(np.int64)), t(edges[:, 0].copy()), t(edges[:, 1].copy()),
                   t(edges[:, 2].copy()), t(dist), t(fixed), fill_id)

    def walk(self, start: int, ids) -> set[int]:
        """States reachable from `start` by the token sequence `ids` (empty: the ids leave the automaton)."""
        states = {start}
        src, cls, dst = self.src.tolist(), self.cls.tolist(), self.dst.tolist()
        for t in ids:
            c = int(self.token_class[t]) if 0 <= t < self.vocab_size else -1
            states = {d for s, k, d in zip(src, cls, dst) if k == c and s in states}
            if not states:
                break
        return states


@dataclass
class Layout:
    """Per-automaton arrays the DP reuses every step. The Viterbi runs over state pairs (src, dst) rather than
    class edges: many classes lead from one state to the same next state (a JSON schema: ~4.5x fewer pairs than
    edges), so a pair's score at a position is the max over its edges, taken for all positions in one call."""

    order: torch.Tensor  # live tokens sorted by class (the automaton's `order`)
    class_starts: np.ndarray  # [K] where each class starts in `order` (np.*.reduceat offsets)
    class_of_order: torch.Tensor  # [V_live] the class of each token of `order`
    edge_cls: np.ndarray  # [E] the class of each edge, edges sorted by (dst, src): each pair's edges contiguous
    pair_starts: np.ndarray  # [P] where each pair's edges start
    pair_src: np.ndarray  # [P] pairs sorted by dst: their source state
    in_bounds: np.ndarray  # [S + 1] pairs into state q are [in_bounds[q], in_bounds[q + 1])
    dst_starts: np.ndarray  # where each state with incoming pairs starts (np.*.reduceat offsets)
    has_in: np.ndarray  # [S] bool: states with incoming pairs, in the order of dst_starts
    # The forward pass numbers states "compactly": those with incoming pairs first (in state order, so pair
    # segments are in that order too), then the others, so a segmented max writes one contiguous row.
    compact: np.ndarray  # [S] each state's compact number
    pair_csrc: np.ndarray  # [P] each pair's source state, compact
    pair_dst: np.ndarray  # [P] each pair's destination state
    # A pair's score is the max over its classes; pairs share few distinct class sets (a JSON schema: ~6x fewer
    # than pairs), so the max is taken once per set: sets of one class are a column, the others a segmented max.
    pair_set: np.ndarray  # [P] each pair's class set
    single_sets: np.ndarray  # sets of one class ...
    single_cls: np.ndarray  # ... and that class
    multi_sets: np.ndarray  # sets of several classes ...
    multi_cls: np.ndarray  # ... their classes, set after set
    multi_of: torch.Tensor  # [len(multi_cls)] the position in multi_sets of each
    n_sets: int
    # Scoring on CPU: a big class (inside a JSON string most of the vocabulary is one class) is scored by a max
    # over the whole row times its 0/1 mask (two streaming passes, exact for probabilities >= 0) instead of
    # gathering its tokens; the other classes' tokens are gathered in class order (`rest_*`).
    big: np.ndarray  # big classes
    big_mask: torch.Tensor  # [len(big), V] float32: 1 for the class's tokens, else 0
    rest_cls: np.ndarray  # the other classes ...
    rest_order: torch.Tensor  # ... their tokens in class order
    rest_starts: np.ndarray  # ... where each starts in rest_order

    @classmethod
    def of(cls, aut: TokenAutomaton) -> Layout:
        src, dst = aut.src.numpy(), aut.dst.numpy()
        by_pair = np.lexsort((aut.cls.numpy(), src, dst))
        key = dst[by_pair] * aut.n_states + src[by_pair]
        first = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, dtype=bool)  # an edge opens a pair
        pair_starts = np.flatnonzero(first)
        pair_dst = dst[by_pair][pair_starts]
        bounds = np.searchsorted(pair_dst, np.arange(aut.n_states + 1))
        has_in = np.diff(bounds) > 0
        sizes = aut.offsets[1:] - aut.offsets[:-1]
        edge_cls = aut.cls.numpy()[by_pair].copy()
        pair_src = src[by_pair][pair_starts].copy()
        n_in = int(has_in.sum())
        compact = np.empty(aut.n_states, dtype=np.int64)
        compact[has_in] = np.arange(n_in)
        compact[~has_in] = np.arange(n_in, aut.n_states)
        sets: dict[tuple[int, ...], int] = {}
        ends = np.r_[pair_starts[1:], edge_cls.size].tolist()
        pair_set = np.asarray([sets.setdefault(tuple(edge_cls[a:b].tolist()), len(sets))
                               for a, b in zip(pair_starts.tolist(), ends)], dtype=np.int64)
        keys = list(sets)
        single = [i for i, k in enumerate(keys) if len(k) == 1]
        multi = [i for i, k in enumerate(keys) if len(k) > 1]
        return cls(aut.order, aut.offsets[:-1].numpy().copy(),
                   torch.repeat_interleave(torch.arange(aut.n_classes), sizes),
                   edge_cls, pair_starts, pair_src, bounds,
                   bounds[:-1][has_in], has_in,
                   compact, compact[pair_src], pair_dst,
                   pair_set, np.asarray(single, dtype=np.int64),
                   np.asarray([keys[i][0] for i in single], dtype=np.int64), np.asarray(multi, dtype=np.int64),
                   np.asarray([k for i in multi for k in keys[i]], dtype=np.int64),
                   torch.repeat_interleave(torch.arange(len(multi)), torch.tensor([len(keys[i]) for i in multi],
                                                                                   dtype=torch.int64)),
                   len(keys), *cls._split(aut, sizes.numpy()))

    @staticmethod
    def _split(aut: TokenAutomaton, sizes: np.ndarray) -> tuple:
        big = np.flatnonzero((sizes >= BIG_CLASS) & (sizes * 4 >= sizes.sum()))
        mask = torch.zeros(big.size, aut.vocab_size, dtype=torch.float32)
        for i, k in enumerate(big.tolist()):
            mask[i, aut.order[aut.offsets[k]:aut.offsets[k + 1]]] = 1.0
        rest = np.setdiff1d(np.arange(sizes.size), big)
        offsets = aut.offsets.numpy()
        order = torch.cat([aut.order[offsets[k]:offsets[k + 1]] for k in rest.tolist()]) if rest.size else \
            torch.zeros(0, dtype=torch.int64)
        return big, mask, rest, order, np.r_[0, np.cumsum(sizes[rest])[:-1]].astype(np.int64)

    @functools.cached_property
    def big_bool(self) -> torch.Tensor:
        """[len(big), V] bool: each big class's tokens."""
        return self.big_mask > 0

    @functools.cached_property
    def lists(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """in_bounds, pair_src, pair starts (with the end) and edge_cls as Python lists, for scalar loops."""
        starts = np.r_[self.pair_starts, self.edge_cls.size]
        return self.in_bounds.tolist(), self.pair_src.tolist(), starts.tolist(), self.edge_cls.tolist()

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """Tensor field `name` on `device` (copied once per device)."""
        copies = self.__dict__.setdefault("_copies", {})
        key = (name, str(device))
        if key not in copies:
            copies[key] = getattr(self, name).to(device)
        return copies[key]
