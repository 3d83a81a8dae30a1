"""Prefix caching: the KV of prompts already prefilled, kept and reused by later prompts that start the same way.

A prompt that goes through a `PrefixCache` is prefilled in passes of `block_tokens` tokens at fixed positions
(0, block, 2 * block, ...; a pass grows past a boundary that would split an image run, as in every chunked
prefill). Each pass is one block, keyed by a chained hash: the previous block's key, the pass's token ids and the
image content it holds (the soft tokens placed there). A later prompt walks its own blocks' keys from the start,
restores the KV of the blocks found and prefills the rest with the same passes.

Why it is exact: a block's states depend only on the tokens (and images) up to its end, and a pass computes
them from the cache state the earlier passes leave. A hit restores that state bit for bit (full-attention layers:
every position; sliding layers: the window, taken from the blocks' stored states), and the passes after it are
the ones a miss runs, with the same shapes and inputs. So a request gives the same KV and the same tokens warm as
on an empty cache, and as with no cache at all when `module.prefill_chunk == block_tokens` (a miss *is* that
chunked prefill). Reuse therefore stops at the last whole block the prompts share: a prefix that ends mid-block
is prefilled from that block's start. Resuming mid-pass would give a pass of another shape, and CPU kernels round
differently with the shape (GEMMs below 16 rows, attention's key blocks), so it would not be exact. For the same
reason committed canvases are not stored: they are encoded in passes that start where the prompt ends, not at
block boundaries, so a later prompt that contains them prefills them in other passes.

The cache belongs to one model; the numerics mode (dtype, device, row-invariant GEMMs or not) is part of each
key, so `rng="fast"` and `"reference"` requests never share blocks. Blocks live on the model's device. Eviction
is least recently used, leaves first (a block's prefix blocks are used whenever it is, so they stay longer), whole
subtrees at once (a block whose parent is gone can never be reached). All methods are thread-safe; prefills run
outside the lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .numerics import ROW_INVARIANT
from .vision import PromptImages

GIB = 1 << 30
BLOCK_TOKENS = 128  # reuse granularity: small enough that a 2000-token shared prefix reuses >= 1920 tokens


@dataclass(eq=False)
class _Block:
    key: bytes
    parent: bytes | None
    tokens: int
    states: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, k and v [Hkv, tokens, D]
    nbytes: int
    children: set[bytes] = field(default_factory=set)


class PrefixCache:
    """Keeps the KV of prefilled prompt blocks for reuse by later prompts with the same prefix.

    budget_bytes: the most bytes of KV kept (blocks beyond it are evicted, least recently used first);
    block_tokens: tokens per block, also the prefill pass of every prompt that goes through the cache.
    Pass it as `dgemma.generate / stream / model.generate(..., prefix_cache=cache)`; each result reports its
    `cached_tokens`; `stats()` sums up."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be an integer >= 1, got {block_tokens!r}")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._tokens = 0
        self._lock = threading.Lock()
        self._module: weakref.ref | None = None
        self._counts = dict(requests=0, prompt_tokens=0, cached_tokens=0, stored_blocks=0, evicted_blocks=0)

    @classmethod
    def from_gib(cls, gib: float, block_tokens: int = BLOCK_TOKENS) -> PrefixCache:
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib >= 0 or gib == float("inf"):
            raise ValueError(f"the prefix cache budget must be a finite number of GiB >= 0, got {gib!r}")
        return cls(int(gib * GIB), block_tokens)

    # -- what the server and batch read ----------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        """Blocks, tokens and bytes held; requests (prompt rows) looked up, their prompt and cached tokens; blocks
        stored and evicted so far."""
        with self._lock:
            c = dict(self._counts)
            return dict(blocks=len(self._blocks), tokens=self._tokens, bytes=self._bytes,
                        budget_bytes=self.budget_bytes, block_tokens=self.block_tokens, **c,
                        hit_rate=c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0)

    def clear(self) -> None:
        """Drop every block (e.g. after changing the model's weights in place)."""
        with self._lock:
            self._blocks.clear()
            self._bytes = self._tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    # -- lookups and inserts (under the lock) --------------------------------------------------------------
    def _bind(self, module) -> None:
        with self._lock:
            owner = self._module() if self._module is not None else None
            if owner is None:
                if self._module is not None:  # the model it was filled by is gone: its blocks mean nothing
                    self._blocks.clear()
                    self._bytes = self._tokens = 0
                self._module = weakref.ref(module)
            elif owner is not module:
                raise ValueError("this PrefixCache holds another model's KV: use one cache per model")

    def _lookup(self, keys: list[bytes]) -> list[_Block]:
        """The blocks of the longest stored prefix of `keys`, marked used."""
        with self._lock:
            hit = []
            for key in keys:
                block = self._blocks.get(key)
                if block is None:
                    break
                hit.append(block)
            self._touch(hit)
            return hit

    def _store(self, chain: list[_Block], new: list[_Block]) -> None:
        """Add `new` (the blocks after `chain`, in order) and evict down to the budget."""
        with self._lock:
            parent = chain[-1].key if chain else None
            if parent is not None and parent not in self._blocks:
                return  # evicted meanwhile: the new blocks could never be reached
            used = list(chain)
            for block in new:
                have = self._blocks.get(block.key)
                if have is None:
                    if block.nbytes > self.budget_bytes:
                        break
                    block.parent = parent
                    self._blocks[block.key] = block
                    self._bytes += block.nbytes
                    self._tokens += block.tokens
                    self._counts["stored_blocks"] += 1
                    if parent is not None:
                        self._blocks[parent].children.add(block.key)
                    have = block
                used.append(have)
                parent = block.key
            self._touch(used)
            while self._bytes > self.budget_bytes:
                self._evict(next(iter(self._blocks)))

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the root ends most recent: leaves go first
            self._blocks.move_to_end(block.key)

    def _evict(self, key: bytes) -> None:
        """Drop a block and whatever is stored below it (no longer reachable). With leaves-first order the
        oldest block has no children left; the walk is for safety, and iterative since chains can be long."""
        root = self._blocks[key]
        if root.parent is not None and root.parent in self._blocks:
            self._blocks[root.parent].children.discard(key)
        stack = [key]
        while stack:
            block = self._blocks.pop(stack.pop(), None)
            if block is None:
                continue
            self._bytes -= block.nbytes
            self._tokens -= block.tokens
            self._counts["evicted_blocks"] += 1
            stack.extend(block.children)

    def _count(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            self._counts["requests"] += 1
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["cached_tokens"] += cached_tokens


def prefill(module, prompt: torch.Tensor, pad: torch.Tensor, kv: KVCache, images: PromptImages | None,
            cache: PrefixCache | None) -> list[int]:
    """Prefill the (left-padded) prompt batch into `kv`, through `cache` when given. Returns the tokens each row
    took from the cache. With a cache each row is prefilled alone (its own blocks, at its own positions) and placed
    into the batch."""
    if cache is None:
        module.encode(prompt, kv, images=images)
        return [0] * prompt.shape[0]
    cache._bind(module)
    if kv.pad is None and prompt.shape[0] == 1:
        return [_prefill_row(module, prompt, kv, images, cache)]
    cached = []
    width = prompt.shape[1]
    for b, p in enumerate(pad.tolist()):
        ids = prompt[b:b + 1, p:]
        row = KVCache(module.config, 1, ids.shape[1] + kv.max_tokens - width, kv.k[0].device, kv.k[0].dtype,
                      scratch=kv.scratch)
        cached.append(_prefill_row(module, ids, row, _row_images(images, b, p), cache))
        kv.place_row(b, row)
    return cached


def _prefill_row(module, ids: torch.Tensor, kv: KVCache, images: PromptImages | None, cache: PrefixCache) -> int:
    """One prompt [1, L] into an empty batch-1 cache: restore the longest cached block prefix, prefill the rest in
    the same passes as a miss, store the new blocks. Returns the cached token count."""
    length, size = ids.shape[1], cache.block_tokens
    ends = images.chunk_ends(length, size) if images is not None else list(range(size, length, size)) + [length]
    keys = _keys(module, ids, ends, images, size)
    hit = cache._lookup(keys)
    done = ends[len(hit) - 1] if hit else 0
    if hit:
        kv.load_prefix(_pieces(hit, kv), done)
    new: list[_Block] = []
    if done < length:
        kv.recording(True)
        try:  # the same passes a miss runs: `ends` after `done`, computed on the tail (greedy from a boundary)
            module.encode(ids[:, done:], kv, chunk=size, images=_shifted(images, done))
        finally:
            recorded = kv.recording(False)
        starts = [done] + ends[len(hit):-1]
        for i, (start, end) in enumerate(zip(starts, ends[len(hit):])):
            states = []
            for layer, keep in enumerate(kv.keep):
                if keep is None:  # full attention: the buffer holds every position
                    k, v = kv.k[layer][0, :, start:end].clone(), kv.v[layer][0, :, start:end].clone()
                else:  # sliding: the pass's states as written, before the window dropped them
                    k, v = (t[0].contiguous() for t in recorded[layer][i])
                states.append((k, v))
            nbytes = sum(t.numel() * t.element_size() for kv_pair in states for t in kv_pair)
            new.append(_Block(keys[len(hit) + i], None, end - start, states, nbytes))
        cache._store(hit, new)
    cache._count(length, done)
    return done


def _pieces(hit: list[_Block], kv: KVCache) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, the hit blocks' states to restore: all for full layers, the last blocks covering the window for
    sliding layers."""
    total = sum(b.tokens for b in hit)
    pieces = []
    for layer, keep in enumerate(kv.keep):
        need, take = (total if keep is None else min(total, keep)), []
        for block in reversed(hit):
            if need <= 0:
                break
            take.append(block.states[layer])
            need -= block.tokens
        pieces.append(take[::-1])
    return pieces


def _keys(module, ids: torch.Tensor, ends: list[int], images: PromptImages | None, size: int) -> list[bytes]:
    """Chained block keys: each hashes the previous key, the pass's token ids and its image content. The root
    holds what else changes the states: the block size, dtype, device and whether GEMMs run row-invariant."""
    root = f"dgemma-prefix-v1|{size}|{module.dtype}|{module.device}|{ROW_INVARIANT.get()}".encode()
    key, keys, start = hashlib.blake2b(root, digest_size=16).digest(), [], 0
    row = ids[0].to("cpu", torch.int64).numpy()
    for end in ends:
        h = hashlib.blake2b(key, digest_size=16)
        h.update(row[start:end].tobytes())
        if images is not None:
            _hash_images(h, images, start, end)
        key = h.digest()
        keys.append(key)
        start = end
    return keys


def _hash_images(h, images: PromptImages, start: int, end: int) -> None:
    idx = images.index[0, start:end]
    slots = idx >= 0
    if not bool(slots.any()):
        return
    feats = images.features.index_select(0, idx[slots])  # the soft tokens these positions take
    h.update(slots.cpu().numpy().tobytes())
    h.update(feats.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    if images.runs is not None:  # which positions see each other (run ids themselves differ with the batch)
        runs = images.runs[0, start:end]
        h.update(((runs[1:] == runs[:-1]) & (runs[1:] >= 0)).cpu().numpy().tobytes())


def _row_images(images: PromptImages | None, b: int, pad: int) -> PromptImages | None:
    if images is None:
        return None
    runs = images.runs[b:b + 1, pad:] if images.runs is not None else None
    return dataclasses.replace(images, index=images.index[b:b + 1, pad:], runs=runs)


def _shifted(images: PromptImages | None, start: int) -> PromptImages | None:
    """The images of a batch-1 prompt seen from position `start` (the tail a hit leaves to prefill)."""
    if images is None or start == 0:
        return images
    runs = images.runs[:, start:] if images.runs is not None else None
    return dataclasses.replace(images, index=images.index[:, start:], runs=runs)
