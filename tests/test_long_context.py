"""Chunked prefill: prompts far longer than a chunk and than the sliding window stay correct, and no attention call
ever sees more than one chunk of queries (memory grows with chunk x keys, never with prompt x prompt)."""

import pytest
import torch
import torch.nn.functional as F

import dgemma
import dgemma.model
from refmodels import build

LONG = 4000
TEXT = dict(max_position_embeddings=8192, sliding_window=48)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref, ckpt = build(tmp_path_factory.mktemp("long"), "long", TEXT, canvas_length=8, seed=4)
    return ref, dgemma.load_model(ckpt)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_long_prompt_logits_match_reference(pair):
    ref, dm = pair
    prompt, canvas = _ids(LONG), _ids(8, seed=1)
    sc = 3 * torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    assert LONG > 3 * dm.module.prefill_chunk  # several chunks, each far longer than the window
    got = dm.canvas_logits(prompt, canvas, self_conditioning_logits=sc)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [5, 47, 200])
def test_chunk_size_does_not_change_the_result(pair, chunk):
    _, dm = pair
    prompt, canvas = _ids(300, seed=3), _ids(8, seed=4)
    want = dm.canvas_logits(prompt, canvas)
    dm.module.prefill_chunk = chunk
    try:
        got = dm.canvas_logits(prompt, canvas)
    finally:
        dm.module.prefill_chunk = dgemma.model.PREFILL_CHUNK
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_padded_batch_of_long_prompts_matches_solo(pair):
    _, dm = pair
    a, b = _ids(2300, seed=5)[0].tolist(), _ids(1100, seed=6)[0].tolist()
    kw = dict(max_new_tokens=16, max_denoising_steps=3, seed=11)
    solo = [dm.generate(p, seed=11 + i, **{k: v for k, v in kw.items() if k != "seed"}) for i, p in enumerate([a, b])]
    batch = dm.generate([a, b], **kw)
    assert [r.ids for r in batch] == [r.ids for r in solo]


def test_attention_sees_one_chunk_of_queries_at_a_time(pair, monkeypatch):
    _, dm = pair
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape), q.shape[-1]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(dgemma.model.F, "scaled_dot_product_attention", spy)
    dm.module.prefill_chunk = 128
    try:
        dm.canvas_logits(_ids(1500, seed=7), _ids(8, seed=8))
    finally:
        dm.module.prefill_chunk = dgemma.model.PREFILL_CHUNK
    window, sliding = dm.config.sliding_window, [s for s in dm.config.layers if s.sliding][0]
    assert sliding.head_dim != [s for s in dm.config.layers if not s.sliding][0].head_dim  # tells the calls apart
    sliding_keys = [k for _, k, _, d in seen if d == sliding.head_dim]
    assert max(q for q, _, _, _ in seen) <= 128
    assert all(m is None or m[0] * m[1] <= 128 * (1500 + 128) for _, _, m, _ in seen)
    # sliding layers read at most the window before the chunk plus the chunk, however long the prompt
    assert sliding_keys and max(sliding_keys) <= window - 1 + 128
