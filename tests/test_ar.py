"""Autoregressive decoding with the causal stack: incremental decoding equals recomputing from scratch, also past
the sliding window, and the causal stack's logits match the reference encoder + lm_head."""

import sys
from pathlib import Path

import torch

import dgemma
from dgemma.ar import ar_generate, ar_stream
from dgemma.checkpoint.write import write_random_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from refmodels import build  # noqa: E402


def _greedy_from_scratch(model, prompt, n):
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            cache = model.module.new_cache(1, len(ids), scratch=1)
            hidden = model.module.encode(torch.tensor([ids]), cache)
            nxt = int(model.module.lm_head(hidden[:, -1]).argmax(-1))
            out.append(nxt)
            ids.append(nxt)
    return out


def test_incremental_equals_recompute_past_the_window(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=4, std=0.3, sliding_window=5, canvas_length=8)
    model = dgemma.load_model(path)
    prompt = [7, 8, 9, 10, 11, 12, 13]
    got = ar_generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    assert got.ids == _greedy_from_scratch(model, prompt, 12)
    assert got.forwards == 12 and got.finish_reason == "length"


def test_stops_at_eos_and_samples_reproducibly(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=4, std=0.3, canvas_length=8)
    model = dgemma.load_model(path)
    first = next(ar_stream(model, [5, 6], max_new_tokens=4, eos_token_id=[]))
    res = ar_generate(model, [5, 6], max_new_tokens=10, eos_token_id=first)
    assert res.ids == [first] and res.finish_reason == "eos"
    a = ar_generate(model, [5, 6], max_new_tokens=10, eos_token_id=[], temperature=1.0, seed=3)
    b = ar_generate(model, [5, 6], max_new_tokens=10, eos_token_id=[], temperature=1.0, seed=3)
    assert a.ids == b.ids


def test_causal_logits_match_reference_encoder(tmp_path):
    ref, ckpt = build(tmp_path, "ar", {}, canvas_length=8, seed=0)
    model = dgemma.load_model(ckpt)
    ids = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = ref.model.encoder(input_ids=ids).last_hidden_state
        want = torch.tanh(ref.lm_head(hidden).float() / 30.0) * 30.0
        got = model.module.lm_head(model.module.encode(ids, model.module.new_cache(1, 13, scratch=1)))
    assert (got - want).abs().max() < 1e-5
