"""step_cache: reuse across denoising steps for settled positions. "off" is today's computation; a pass over a subset
of positions attends to the others' K/V as the last pass left them, so with nothing changed it gives the full
pass's rows; a policy under which nothing settles computes exactly what "off" computes."""

from __future__ import annotations

import math

import pytest
import torch

from dgemma import config as C
from dgemma.bench.measure import step_cache_schedule
from dgemma.config import GenerationConfig
from dgemma.generate import unsettled_positions
from dgemma.numerics import put_rows, take_rows
from dgemma.presets import random_model
from dgemma.requests import DiffusionSettings


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=4)


def _prefilled(model, batch: int = 2):
    net = model.module
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 200, (batch, 9), generator=g)
    c = model.config.canvas_length
    cache = net.new_cache(batch, prompt.shape[1], scratch=c)
    net.encode(prompt, cache)
    canvas = torch.randint(3, 200, (batch, c), generator=g)
    probs = torch.softmax(torch.randn(batch, c, model.config.vocab_size, generator=g), -1)
    return net, cache, canvas, probs


def test_unsettled_positions_rows_are_independent():
    active = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pos = unsettled_positions(active)
    assert pos.shape == (3, 3)
    assert pos[0].tolist() == [1, 2, 4]
    assert pos[1].tolist() == [0, 0, 0]  # one active position, repeated
    assert pos[2].tolist() == [0, 0, 0]  # none: position 0
    alone = unsettled_positions(active[1:2])
    assert alone.tolist() == [[0]]  # the row's own set, whatever its neighbours


def test_take_and_put_rows_are_gather_and_scatter_along_the_positions():
    """The step cache's row copies (numerics.take_rows / put_rows) give what a gather / scatter_ with the positions
    expanded over the last dim gives: per batch row, repeated positions (the padding of unsettled_positions) and a
    destination whose rows are padded (the LM head's output is such a view)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 40, generator=g).to(torch.bfloat16)
    pos = unsettled_positions(torch.tensor([[0, 1, 1, 0, 1, 0, 1], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool))
    assert pos[1].tolist() == [3, 3, 3, 3]
    index = pos[..., None].expand(-1, -1, x.shape[-1])
    assert torch.equal(take_rows(x, pos), x.gather(1, index))
    values = x.gather(1, index) * 2
    padded = torch.zeros(2, 7, 48, dtype=torch.bfloat16)[..., :40]
    padded.copy_(x)
    want = x.clone().scatter_(1, index, values)
    got = put_rows(padded, pos, values)
    assert got is padded and torch.equal(padded, want)
    cache = torch.randn(2, 3, 9, 4, generator=g)  # a layer's K: [B, heads, T, D], the positions along T
    kv = torch.randn(2, 3, pos.shape[1], 4, generator=g)
    kv[1] = kv[1, :, :1]  # row 1's repeated position carries the same values
    index = (pos + 2)[:, None, :, None].expand(-1, 3, -1, 4)
    assert torch.equal(put_rows(cache.clone(), pos + 2, kv, dim=2), cache.clone().scatter_(2, index, kv))


@torch.inference_mode()
def test_pass_over_all_positions_is_the_full_pass(model):
    net, cache, canvas, probs = _prefilled(model)
    full = net.decode_hidden(canvas, cache, sc_probs=probs)
    every = torch.arange(canvas.shape[1]).expand(canvas.shape[0], -1)
    torch.testing.assert_close(net.decode_hidden(canvas, cache, sc_probs=probs, positions=every), full,
                               rtol=0, atol=1e-6)


@torch.inference_mode()
def test_subset_pass_after_a_full_pass_gives_the_full_rows(model):
    net, cache, canvas, probs = _prefilled(model)
    full = net.decode_hidden(canvas, cache, sc_probs=probs)  # leaves every position's K/V in the scratch
    active = torch.zeros(canvas.shape, dtype=torch.bool)
    active[0, [1, 5, 9]] = True
    active[1, [0, 30]] = True
    pos = unsettled_positions(active)
    part = net.decode_hidden(canvas, cache, sc_probs=probs, positions=pos)
    assert part.shape == (2, 3, model.config.hidden_size)
    torch.testing.assert_close(part, full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_subset_pass_sees_the_stale_states_of_the_others(model):
    """The settled positions' K/V are the last pass's: change a settled token without recomputing it and the
    active rows do not see the change (that is the approximation the policy makes)."""
    net, cache, canvas, probs = _prefilled(model, batch=1)
    net.decode_hidden(canvas, cache, sc_probs=probs)
    pos = torch.tensor([[3, 4]])
    before = net.decode_hidden(canvas, cache, sc_probs=probs, positions=pos)
    changed = canvas.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 200 + 3
    after = net.decode_hidden(changed, cache, sc_probs=probs, positions=pos)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    fresh = net.decode_hidden(changed, cache, sc_probs=probs)[:, 3:5]
    assert not torch.allclose(fresh, before, atol=1e-7)


@pytest.mark.parametrize("rng", ["fast", "reference"])
def test_policy_where_nothing_settles_is_the_exact_path(model, monkeypatch, rng):
    want = model.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=64, seed=3, rng=rng, entropy_bound=50.0)
    monkeypatch.setitem(C.STEP_CACHE, "fast", C.StepCachePolicy(settle=10**6, refresh=4))
    got = model.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=64, seed=3, rng=rng, entropy_bound=50.0,
                         step_cache="fast")
    assert [r.ids for r in got] == [r.ids for r in want]
    assert [r.steps for r in got] == [r.steps for r in want]


@pytest.mark.parametrize("policy", [p for p in C.STEP_CACHE if p != "off"])
def test_policies_run_and_off_is_the_default(model, policy):
    assert GenerationConfig().step_cache == "off"
    base = model.generate([5, 6, 7], max_new_tokens=64, seed=1, entropy_bound=50.0)
    off = model.generate([5, 6, 7], max_new_tokens=64, seed=1, entropy_bound=50.0, step_cache="off")
    assert off.ids == base.ids and off.steps == base.steps
    fast = model.generate([5, 6, 7], max_new_tokens=64, seed=1, entropy_bound=50.0, step_cache=policy)
    assert len(fast.ids) > 0 and all(0 <= t < model.config.vocab_size for t in fast.ids)


def test_setting_is_declared_once_and_checked_everywhere():
    with pytest.raises(ValueError, match="step_cache must be one of 'off', 'fast', 'fastest'"):
        GenerationConfig().replace(step_cache="always")
    assert DiffusionSettings(step_cache="fast").overrides() == {"step_cache": "fast"}
    with pytest.raises(ValueError):
        DiffusionSettings(step_cache="always")


def test_fast_passes_compute_fewer_positions(model, monkeypatch):
    """With tokens settling (a high entropy bound accepts most of them), the off-refresh passes of "fast" run the
    decoder on a subset of the canvas; "off" never does."""
    seen = {"off": [], "fast": []}
    real = model.module.decode_hidden
    for policy in seen:
        def spy(canvas, cache, *a, positions=None, _p=policy, **k):
            seen[_p].append(canvas.shape[1] if positions is None else positions.shape[1])
            return real(canvas, cache, *a, positions=positions, **k)

        monkeypatch.setattr(model.module, "decode_hidden", spy)
        model.generate([5, 6, 7], max_new_tokens=32, seed=2, entropy_bound=1e6, stability_threshold=None,
                       max_denoising_steps=8, step_cache=policy)
        monkeypatch.undo()
    c = model.config.canvas_length
    assert seen["off"] == [c] * 8
    every = C.STEP_CACHE["fast"].refresh
    assert seen["fast"][0] == c and seen["fast"][every] == c  # a canvas's first step and every refresh-th: all
    assert min(n for i, n in enumerate(seen["fast"]) if i % every) < c


def test_top_k_soft_embedding_is_exact_when_k_covers_the_mass_and_keeps_the_tail_at_the_mean(model):
    emb = model.module.embed_tokens
    v = emb.weight.shape[0]
    g = torch.Generator().manual_seed(5)
    probs = torch.zeros(2, 3, v)
    ids = torch.randint(0, v, (2, 3, 4), generator=g)
    probs.scatter_(-1, ids, torch.rand(2, 3, 4, generator=g) + 0.1)
    probs /= probs.sum(-1, keepdim=True)  # at most 4 tokens with mass per position
    torch.testing.assert_close(emb.soft(probs, top_k=4), emb.soft(probs), rtol=1e-5, atol=1e-6)
    full = torch.softmax(torch.randn(2, 3, v, generator=g) * 3, -1)
    p, top = full.topk(5, dim=-1)
    mean = emb.weight.float().mean(0)
    want = (p.unsqueeze(-1) * emb.weight[top].float()).sum(-2) + (1 - p.sum(-1, keepdim=True)) * mean
    torch.testing.assert_close(emb.soft(full, top_k=5), want, rtol=1e-5, atol=1e-6)
    assert emb.soft(full, top_k=v).equal(emb.soft(full))  # k >= V: the exact product


def test_mean_row_follows_the_table():
    emb = random_model("tiny", seed=6).module.embed_tokens
    before = emb.mean_row().clone()
    torch.testing.assert_close(before, emb.weight.float().mean(0))
    with torch.no_grad():
        emb.weight.add_(1.0)  # in place: the version counter moves
    torch.testing.assert_close(emb.mean_row(), before + 1.0)


def test_a_top_k_policy_changes_only_the_self_conditioning_input(model, monkeypatch):
    """With nothing settling, a policy with sc_top_k >= V is the exact path, and a small k runs the same loop."""
    want = model.generate([[5, 6, 7, 8]], max_new_tokens=32, seed=3, entropy_bound=50.0)
    v = model.config.vocab_size
    monkeypatch.setitem(C.STEP_CACHE, "fast", C.StepCachePolicy(settle=10**6, refresh=4, sc_top_k=v))
    got = model.generate([[5, 6, 7, 8]], max_new_tokens=32, seed=3, entropy_bound=50.0, step_cache="fast")
    assert got.ids == want.ids and got.steps == want.steps
    seen = []
    real = model.module.embed_tokens.soft
    monkeypatch.setattr(model.module.embed_tokens, "soft", lambda p, k=None: seen.append(k) or real(p, k))
    monkeypatch.setitem(C.STEP_CACHE, "fast", C.StepCachePolicy(settle=10**6, refresh=4, sc_top_k=8))
    model.generate([[5, 6, 7, 8]], max_new_tokens=32, seed=3, entropy_bound=50.0, step_cache="fast")
    assert seen and set(seen) == {8}


@pytest.mark.parametrize("settle, refresh, rate", [(2, 2, 15.0), (2, 4, 20.0), (3, 3, 7.5), (1, 5, 64.0)])
def test_benchmark_schedule_counts_settled_positions_as_the_streak_rule_does(settle, refresh, rate):
    """bench.measure.step_cache_schedule against an independent count: the denoising loop's streak rule run on a
    canvas where `rate` more tokens are accepted at every pass and accepted tokens never change."""
    canvas = 256
    policy = C.StepCachePolicy(settle=settle, refresh=refresh)
    schedule = step_cache_schedule(policy, canvas, rate)
    assert len(schedule) == math.ceil(canvas / rate)
    streak = torch.zeros(canvas, dtype=torch.int32)
    for i, settled in enumerate(schedule):
        if i % refresh == 0:
            assert settled is None
        else:
            assert settled == int((streak >= settle).sum())
        accepted = torch.arange(canvas) < int(rate * (i + 1))  # the same tokens, once accepted, stay accepted
        streak = torch.where(accepted, streak + 1, 0)
