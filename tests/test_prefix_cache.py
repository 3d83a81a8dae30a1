"""Prefix caching: a request gives the same KV and the same tokens with and without the cache (fp32,
rng="reference"): full hits, prefixes that end mid-block, misses, after evictions, with sliding windows shorter and
longer than the prefix, padded batches and images; the budget, LRU order and the cache's bookkeeping."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

import dgemma
from dgemma.prefix_cache import PrefixCache, prefill
from dgemma.presets import random_model

BLOCK = 16
KW = dict(max_new_tokens=40, seed=5, rng="reference", max_denoising_steps=4)


def _model(sliding_window: int = 64, chunk: int = BLOCK):
    """The tiny preset (canvas 32, three sliding layers and one full) prefilled in `chunk`-token passes: with
    chunk == BLOCK a prefill without the cache runs the passes a cache miss runs."""
    model = random_model("tiny", sliding_window=sliding_window, seed=1)
    model.module.prefill_chunk = chunk
    return model


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 262, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


BASE = _ids(150, 0)
# (prompt, tokens the cache holds for it when it comes in this order)
SEQUENCE = [
    (BASE + _ids(7, 1), 0),  # miss: everything prefilled
    (BASE + _ids(7, 1), 157),  # the same prompt: a full hit, the partial last block included
    (BASE[:100] + _ids(30, 2), 96),  # shares 100 tokens: mid-block, reuse stops at the block boundary (6 x 16)
    (BASE[:100] + _ids(30, 2) + _ids(50, 3), 128),  # a new turn of the previous prompt: its whole blocks
    (_ids(60, 4), 0),  # nothing shared
    (BASE[:40], 32),  # a strict prefix of a stored prompt, ending mid-block
]


def _state(kv) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    return [(kv.start[i], kv.count[i], kv.k[i][:, :, :kv.count[i]].clone(), kv.v[i][:, :, :kv.count[i]].clone())
            for i in range(len(kv.k))]


def _prefilled(model, ids: list[int], cache: PrefixCache | None):
    """The KV state a prefill of `ids` leaves, through `cache` or without one, and the cached token count."""
    module = model.module
    prompt = torch.tensor([ids])
    kv = module.new_cache(1, len(ids) + 64)
    with torch.inference_mode():
        cached = prefill(module, prompt, torch.zeros(1, dtype=torch.long), kv, None, cache)
    return _state(kv), kv.length, cached[0]


def _assert_same_state(a, b):
    assert len(a) == len(b)
    for layer, ((s1, n1, k1, v1), (s2, n2, k2, v2)) in enumerate(zip(a, b)):
        assert (s1, n1) == (s2, n2), layer
        assert torch.equal(k1, k2) and torch.equal(v1, v2), layer  # bit for bit, not close


@pytest.mark.parametrize("window", [10, 40, 1000])
def test_a_hit_restores_the_kv_a_miss_computes_bit_for_bit(window):
    """Windows shorter than a block, spanning several blocks, and longer than every prompt."""
    model = _model(window)
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    for ids, want_cached in SEQUENCE:
        warm, length, cached = _prefilled(model, ids, cache)
        assert cached == want_cached and length == len(ids)
        cold, _, _ = _prefilled(model, ids, PrefixCache(1 << 30, block_tokens=BLOCK))
        plain, _, _ = _prefilled(model, ids, None)  # model.prefill_chunk == BLOCK: the same passes
        _assert_same_state(warm, cold)
        _assert_same_state(warm, plain)


def test_kv_state_after_the_hit_is_what_a_prefill_of_the_prefix_leaves():
    """load_prefix alone: the cache restored at a block boundary equals a cache that encoded those blocks."""
    model = _model(10)
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    _prefilled(model, BASE, cache)
    prefix = BASE[:64]  # four whole blocks: a full hit
    warm, _, cached = _prefilled(model, prefix, cache)
    plain, _, _ = _prefilled(model, prefix, None)
    assert cached == 64
    _assert_same_state(warm, plain)


@pytest.mark.parametrize("window", [10, 1000])
def test_same_tokens_with_and_without_the_cache(window):
    model = _model(window)
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    for ids, want_cached in SEQUENCE:
        got = model.generate(ids, prefix_cache=cache, **KW)
        want = model.generate(ids, **KW)
        assert got.ids == want.ids
        assert got.cached_tokens == want_cached and want.cached_tokens is None
        assert got.to_dict()["cached_tokens"] == want_cached and "cached_tokens" not in want.to_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warm_equals_cold_with_the_default_prefill_chunk(dtype):
    """With model.prefill_chunk != block_tokens a miss prefills in blocks too: warm requests match an empty cache."""
    model = _model(40, chunk=1024)
    model.module.to(dtype)
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    for ids, want_cached in SEQUENCE:
        got = model.generate(ids, prefix_cache=cache, **KW)
        cold = model.generate(ids, prefix_cache=PrefixCache(1 << 30, block_tokens=BLOCK), **KW)
        assert got.ids == cold.ids and got.cached_tokens == want_cached and cold.cached_tokens == 0


def test_stream_reports_cached_tokens_in_the_final_event():
    model = _model()
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    model.generate(BASE, prefix_cache=cache, **KW)
    events = list(dgemma.stream(model, BASE + [7, 8], prefix_cache=cache, **KW))
    assert isinstance(events[-1], dgemma.Done) and events[-1].results[0].cached_tokens == 144
    commits = [e for e in events if isinstance(e, dgemma.Commit)]  # known before a row ends (a server's usage)
    assert commits and all(c.cached_tokens == [144] for c in commits)
    assert all(e.cached_tokens is None for e in dgemma.stream(model, BASE, **KW) if isinstance(e, dgemma.Commit))


def test_padded_batch_rows_match_their_solo_runs():
    """Rows of different lengths through one cache (a shared system prompt): each row restores its own blocks (a
    later row reuses an earlier row's), and gets what it gets alone, with or without the cache (rng="fast")."""
    model = _model(40)
    system = _ids(70, 6)
    prompts = [system + _ids(20, 7), system + _ids(45, 8), _ids(30, 9)]
    kw = dict(max_new_tokens=40, max_denoising_steps=4)
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    batch = model.generate(prompts, seed=11, prefix_cache=cache, **kw)
    assert [r.cached_tokens for r in batch] == [0, 64, 0]
    again = model.generate(prompts, seed=11, prefix_cache=cache, **kw)
    assert [r.cached_tokens for r in again] == [90, 115, 30]  # full hits
    solo = [model.generate(p, seed=11 + i, **kw) for i, p in enumerate(prompts)]
    assert [r.ids for r in batch] == [r.ids for r in again] == [r.ids for r in solo]


def test_rng_modes_do_not_share_blocks():
    """rng="fast" computes with row-invariant GEMMs, "reference" without: their KV differs in the last bits, so a
    block stored under one is never restored under the other."""
    model = _model()
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    model.generate(BASE, prefix_cache=cache, **KW)
    fast = model.generate(BASE, prefix_cache=cache, max_new_tokens=40, seed=5, max_denoising_steps=4)
    assert fast.cached_tokens == 0
    assert cache.stats()["blocks"] == 2 * 10


def _parents_present(cache: PrefixCache) -> bool:
    return all(b.parent is None or b.parent in cache._blocks for b in cache._blocks.values())


def test_budget_evicts_least_recently_used_leaves_first():
    model = _model()
    one = PrefixCache(1 << 30, block_tokens=BLOCK)
    _prefilled(model, _ids(BLOCK, 0), one)
    block_bytes = one.stats()["bytes"]  # every 16-token block is this big
    cache = PrefixCache(15 * block_bytes, block_tokens=BLOCK)
    a, b, c = _ids(96, 10), _ids(96, 11), _ids(96, 12)  # six blocks each
    for ids in (a, b):
        _prefilled(model, ids, cache)
    assert cache.stats()["bytes"] == 12 * block_bytes and cache.stats()["evicted_blocks"] == 0
    assert _prefilled(model, a, cache)[2] == 96  # a is now more recently used than b
    _prefilled(model, c, cache)  # six more blocks: three must go, b's last three (leaves before their parents)
    s = cache.stats()
    assert s["bytes"] == 15 * block_bytes and s["evicted_blocks"] == 3 and _parents_present(cache)
    assert _prefilled(model, a, cache)[2] == 96
    warm, _, cached = _prefilled(model, b, cache)  # b's first three blocks are left; its last three come back
    assert cached == 48 and cache.stats()["evicted_blocks"] == 6  # ... evicting c's last three, now the oldest
    assert _prefilled(model, c, cache)[2] == 48 and _parents_present(cache)
    cold, _, _ = _prefilled(model, b, None)
    _assert_same_state(warm, cold)


def test_evicting_a_block_drops_what_hangs_below_it():
    """A block whose prefix is gone can never be reached again: it goes with its parent (and the stats follow)."""
    model = _model()
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    _prefilled(model, BASE, cache)  # ten blocks in one chain
    _prefilled(model, BASE[:64] + _ids(40, 13), cache)  # a branch after four shared blocks: three more
    root = next(b for b in cache._blocks.values() if b.parent is None)
    second = next(iter(root.children))
    cache._evict(second)
    s = cache.stats()
    assert s["blocks"] == 1 and s["tokens"] == BLOCK and s["evicted_blocks"] == 12
    assert s["bytes"] == root.nbytes and root.children == set()
    assert _prefilled(model, BASE, cache)[2] == BLOCK


def test_a_budget_too_small_for_a_block_stores_nothing_and_stays_exact():
    model = _model()
    cache = PrefixCache(100, block_tokens=BLOCK)
    for ids, _ in SEQUENCE[:3]:
        got = model.generate(ids, prefix_cache=cache, **KW)
        assert got.cached_tokens == 0 and got.ids == model.generate(ids, **KW).ids
    assert cache.stats()["blocks"] == 0 and cache.stats()["bytes"] == 0


def test_stats_and_clear():
    model = _model()
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    for ids, _ in SEQUENCE[:3]:
        _prefilled(model, ids, cache)
    s = cache.stats()
    assert s["requests"] == 3 and s["prompt_tokens"] == 157 + 157 + 130 and s["cached_tokens"] == 157 + 96
    assert s["blocks"] == len(cache) == 10 + 3 and s["tokens"] == 157 + 34
    assert s["hit_rate"] == pytest.approx(253 / 444)
    cache.clear()
    assert len(cache) == 0 and cache.stats()["bytes"] == 0
    assert _prefilled(model, SEQUENCE[0][0], cache)[2] == 0


def test_one_cache_per_model():
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    first = _model()
    _prefilled(first, BASE, cache)
    with pytest.raises(ValueError, match="another model"):
        _prefilled(_model(), BASE, cache)
    assert _prefilled(first, BASE, cache)[2] == 150
    del first
    gc.collect()  # once the model is gone its blocks mean nothing: the next model starts from an empty cache
    assert _prefilled(_model(), BASE, cache)[2] == 0 and cache.stats()["blocks"] == 10


@pytest.mark.parametrize("bad", [dict(budget_bytes=-1), dict(budget_bytes=1.5), dict(budget_bytes=True),
                                 dict(budget_bytes=10, block_tokens=0), dict(budget_bytes=10, block_tokens=2.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        PrefixCache(**bad)


def test_from_gib_and_wrong_type():
    assert PrefixCache.from_gib(0.5).budget_bytes == 1 << 29
    for bad in (-1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError):
            PrefixCache.from_gib(bad)
    with pytest.raises(TypeError, match="PrefixCache"):
        _model().generate(BASE, prefix_cache={"budget": 1}, **KW)


def test_threads_share_one_cache():
    """Requests from several threads at once: each gets its cold result, the bookkeeping adds up."""
    model = _model()
    prompts = [BASE[:80 + 10 * i] + _ids(5, 20 + i) for i in range(4)]
    want = [model.generate(p, **KW).ids for p in prompts]
    cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    got: dict[int, list[int]] = {}

    def work(i):
        got[i] = model.generate(prompts[i], prefix_cache=cache, **KW).ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == want
    s = cache.stats()
    assert s["requests"] == 4 and s["bytes"] == sum(b.nbytes for b in cache._blocks.values())
    assert _parents_present(cache)


# -- images ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    from imagemodels import build_vision_checkpoint

    _, path = build_vision_checkpoint(tmp_path_factory.mktemp("img"), text={"use_bidirectional_attention": "vision"})
    model = dgemma.load_model(path, dtype=torch.float32)
    model.module.prefill_chunk = 8
    return model


def test_images_are_part_of_the_key(image_model):
    """The same ids with another image: blocks holding the image (and every later one) are not reused; image runs
    (bidirectional, longer than a block) stay whole in one pass, as in any chunked prefill."""
    from imagemodels import BOI, EOI, IMAGE, PROCESSOR
    from PIL import Image

    def pixels(seed):
        img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(28, 40, 3), dtype=np.uint8))
        return dgemma.preprocess_images([img], max_soft_tokens=PROCESSOR["max_soft_tokens"],
                                        config=dgemma.images.ImageProcessorConfig(**PROCESSOR))

    a, b = pixels(0), pixels(1)
    n = a["num_soft_tokens"][0]
    text = [2] + list(range(40, 60))  # 21 text tokens: the image starts inside the third block of 8
    ids = torch.tensor([text + [BOI] + [IMAGE] * n + [EOI] + list(range(60, 75))])
    kw = dict(max_new_tokens=16, seed=3, rng="reference", max_denoising_steps=6)
    cache = PrefixCache(1 << 30, block_tokens=8)
    for proc, want_cached in ((a, 0), (a, ids.shape[1]), (b, 16), (b, ids.shape[1])):
        inputs = dict(pixel_values=proc["pixel_values"], image_position_ids=proc["image_position_ids"])
        got = image_model.generate(ids, prefix_cache=cache, **inputs, **kw)
        want = image_model.generate(ids, **inputs, **kw)
        assert got.ids == want.ids and got.cached_tokens == want_cached


# -- dgemma batch ------------------------------------------------------------------------------------------------

def test_batch_prefills_a_shared_system_prompt_once(tmp_path):
    """`dgemma batch --prefix-cache-gib`: lines that share a system prompt reuse its blocks, and every line's
    record is the same in any batch size, with the cache empty or warm."""
    import json

    from dgemma.batch import BatchOptions, run_batch, run_lines
    from dgemma.checkpoint.write import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "model", "tiny", seed=2)
    system = "You are a careful assistant; answer in one short sentence. " * 5  # 295 bytes: two whole blocks
    lines = [json.dumps({"id": i, "prompt": system + f"Question {i}: why?", "max_new_tokens": 32}) for i in range(5)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = dgemma.load_model(ckpt)
    cache = PrefixCache.from_gib(0.01)
    records = run_lines(model, list(enumerate(lines, 1)), 0, None, cache)
    s = cache.stats()
    assert s["requests"] == 5 and s["cached_tokens"] == 4 * 256  # prefilled once, then restored 4 times
    again = run_lines(model, list(enumerate(lines, 1)), 0, None, cache)  # every prompt now a full hit
    assert again == records and cache.stats()["cached_tokens"] == 4 * 256 + s["prompt_tokens"]
    outs = []
    for max_batch in (2, 5):
        out = tmp_path / f"out{max_batch}.jsonl"
        run_batch(BatchOptions(str(inp), str(out), str(ckpt), max_batch=max_batch, progress=False,
                               prefix_cache_gib=0.01))
        outs.append([json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()])
    assert outs[0] == outs[1] == records
    with pytest.raises(ValueError, match="prefix-cache-gib"):
        BatchOptions(str(inp), str(tmp_path / "x.jsonl"), str(ckpt), prefix_cache_gib=-1.0).validate()
