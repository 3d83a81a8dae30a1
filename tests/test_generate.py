"""Generation behaviour beyond reference parity: batching, streaming events, settings, bad input."""

import pytest
import torch

import dgemma
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.sampler import accept_mask

PROMPTS = [[5, 17, 3, 9, 11, 40, 41, 42, 43, 44, 70, 71, 72], [7, 8], [100, 101, 102, 103, 104]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # std 0.3 makes the random model's distributions peaked, like a trained model's
    path = write_random_checkpoint(tmp_path_factory.mktemp("ck") / "m", "tiny", seed=3, std=0.3,
                                   canvas_length=16, sliding_window=6)
    return dgemma.load_model(path)


def test_batch_matches_solo_runs(model):
    kw = dict(max_new_tokens=40, max_denoising_steps=10, entropy_bound=0.5)
    solo = [model.generate(p, seed=20 + i, **kw) for i, p in enumerate(PROMPTS)]
    batch = model.generate(PROMPTS, seed=20, **kw)  # row i uses seed 20 + i
    assert isinstance(batch, list) and len(batch) == 3
    for s, b in zip(solo, batch):
        assert s.ids == b.ids and s.steps == b.steps and s.tokens_per_forward == b.tokens_per_forward
    explicit = model.generate(PROMPTS[::-1], seed=[22, 21, 20], **kw)
    assert [r.ids for r in explicit] == [s.ids for s in solo[::-1]]
    assert len({tuple(s.ids) for s in solo}) == 3


def _eos_set_ending_rows_apart(canvases: list[list[set[int]]]) -> list[int]:
    """EOS ids (one or two tokens) under which every row ends, not all in the same canvas."""
    tokens = sorted(set().union(*(c for row in canvases for c in row)))
    for i, t in enumerate(tokens):
        for eos in ([t], *([t, u] for u in tokens[i + 1:])):
            ends = [next((k for k, c in enumerate(row) if c & set(eos)), None) for row in canvases]
            if None not in ends and len(set(ends)) > 1:
                return eos
    raise AssertionError(f"no EOS set ends the rows in different canvases: {canvases}")


def test_batch_with_early_stopping_rows(model):
    """Rows finish at different times (adaptive stopping, EOS); the others are unaffected."""
    kw = dict(max_new_tokens=48, max_denoising_steps=12, entropy_bound=1.0, confidence_threshold=1.5,
              stability_threshold=0)
    # A row's tokens do not depend on the EOS ids up to its first EOS, so EOS ids are picked from a run without
    # EOS (a random model's tokens depend on the CPU's rounding): every row then ends, at different canvases.
    free = [[e.ids[0].tolist() for e in model.stream(p, seed=50 + i, eos_token_id=None, **kw)
             if isinstance(e, dgemma.Commit)] for i, p in enumerate(PROMPTS)]
    eos = _eos_set_ending_rows_apart([[set(c) for c in row] for row in free])
    solo = [model.generate(p, seed=50 + i, eos_token_id=eos, **kw) for i, p in enumerate(PROMPTS)]
    batch = model.generate(PROMPTS, seed=50, eos_token_id=eos, **kw)
    for s, b, f in zip(solo, batch, free):
        assert s.ids == b.ids and s.steps == b.steps
        flat = [t for c in f for t in c]
        end = next(i for i, t in enumerate(flat) if t in eos)
        assert s.ids == [t for t in flat[:end + 1] if t != model.generation_config.pad_token_id]
    # the settings really exercise both paths: rows stop early at different steps, and some row ends at EOS
    # after fewer canvases than another
    steps = [st for s in solo for st in s.steps]
    assert max(steps) < 12 and len(set(steps)) > 1
    assert {s.finish_reason for s in solo} == {"eos"} and len({len(s.steps) for s in solo}) > 1


def test_stream_events(model):
    events = list(model.stream(PROMPTS[0], seed=1, max_new_tokens=32, max_denoising_steps=5, entropy_bound=0.3))
    drafts = [e for e in events if isinstance(e, dgemma.Draft)]
    commits = [e for e in events if isinstance(e, dgemma.Commit)]
    done = events[-1]
    assert isinstance(done, dgemma.Done)
    assert len(commits) == len(done.results[0].steps) <= 2
    assert len(drafts) == sum(done.results[0].steps)
    for d in drafts:
        assert d.canvas.shape == d.argmax.shape == d.accepted.shape == d.entropy.shape == (1, 16)
        assert torch.equal(d.accepted, accept_mask(d.entropy, 0.3))
        assert 1 <= d.step <= 5 and d.steps_remaining == 6 - d.step
    result = done.results[0]
    committed = torch.cat([c.ids for c in commits], dim=1)[0]
    assert [t for t in committed.tolist() if t != 0] == result.ids


def test_same_seed_same_tokens_and_modes_differ(model):
    a = model.generate(PROMPTS[1], seed=9, max_new_tokens=16, max_denoising_steps=6)
    b = model.generate(PROMPTS[1], seed=9, max_new_tokens=16, max_denoising_steps=6)
    c = model.generate(PROMPTS[1], seed=10, max_new_tokens=16, max_denoising_steps=6)
    r = model.generate(PROMPTS[1], seed=9, max_new_tokens=16, max_denoising_steps=6, rng="reference")
    assert a.ids == b.ids and a.seed == 9
    assert a.ids != c.ids and a.ids != r.ids


def test_whole_canvases_eos_and_pad(model):
    out = model.generate(PROMPTS[0], seed=3, max_new_tokens=17, max_denoising_steps=4, eos_token_id=None)
    assert len(out.ids) == 32 and len(out.steps) == 2 and out.finish_reason == "length"
    # make one token an EOS: generation stops there, later canvases are not produced, nothing after EOS
    eos = out.ids[5]
    out2 = model.generate(PROMPTS[0], seed=3, max_new_tokens=48, max_denoising_steps=4, eos_token_id=eos)
    first = out2.ids.index(eos)
    assert out2.ids[-1] == eos and first == len(out2.ids) - 1 and len(out2.steps) == 1
    assert out2.finish_reason == "eos" and 0 not in out2.ids
    assert out2.tokens_per_forward == pytest.approx(len(out2.ids) / sum(out2.steps), rel=1e-6)


def test_text_prompts_and_timings(model):
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    out = model.generate(ids, seed=0, max_new_tokens=16, max_denoising_steps=3)
    assert out.text == model.tokenizer.decode(out.ids)
    for key in ("prefill_s", "denoise_s", "commit_s", "total_s", "tokens_per_s"):
        assert out.timings[key] >= 0
    assert out.timings["total_s"] >= out.timings["denoise_s"] > 0


@pytest.mark.parametrize("prompt, kwargs, match", [
    ([], {}, "at least one token"),
    ([[1, 2], []], {}, "at least one token"),
    ([5, 999], {}, "outside the vocabulary"),
    ([5, -1], {}, "outside the vocabulary"),
    ([5, 1.5], {}, "integers"),
    ([5, 6], {"seed": [1, 2]}, "seeds"),
    ([5, 6], {"seed": -3}, "seed"),
    ([5, 6], {"rng": "magic"}, "rng"),
    ([5, 6], {"max_new_tokens": 0}, "max_new_tokens"),
    ([5, 6], {"max_new_tokens": 10**9}, "positions"),
    ([5, 6], {"t_min": 0.9, "t_max": 0.5}, "t_max"),
    ([5, 6], {"top_p": 0.9}, "unknown generation setting"),
])
def test_bad_input(model, prompt, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(prompt, **kwargs)
    # the model keeps working afterwards
    assert model.generate([5, 6], seed=0, max_new_tokens=8, max_denoising_steps=2).ids


def test_canvas_logits_validation(model):
    p = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="2-D"):
        model.canvas_logits(p[0], torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model.canvas_logits(p, torch.tensor([[1, 99999]]))
    with pytest.raises(ValueError, match="self_conditioning_logits"):
        model.canvas_logits(p, torch.tensor([[1, 2]]), torch.zeros(1, 3, 262))
    logits = model.canvas_logits(p, torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 262) and logits.dtype == torch.float32
    assert float(logits.abs().max()) <= 30.0


def _draft_runs(model, **kw):
    drafts, done = [], None
    for ev in model.stream(PROMPTS[0], max_new_tokens=16, seed=4, max_denoising_steps=6, **kw):
        if isinstance(ev, dgemma.Draft):
            drafts.append(ev)
        elif isinstance(ev, dgemma.Done):
            done = ev.results[0]
    return drafts, done


def test_verifier_that_rejects_nothing_changes_nothing(model):
    calls = []

    def nothing(tokens, positions):
        calls.append(tokens.shape)
        return torch.zeros_like(positions)

    plain, a = _draft_runs(model)
    verified, b = _draft_runs(model, verifier=nothing)
    assert calls and a.ids == b.ids and a.steps == b.steps
    assert all(torch.equal(x.accepted, y.accepted) for x, y in zip(plain, verified))


def test_verifier_rejections_are_renoised_and_block_early_stop(model):
    """Rejected positions are never accepted; a row the verifier rejects keeps denoising to the step cap."""
    def odd_positions(tokens, positions):
        reject = torch.zeros_like(positions)
        reject[:, 1::2] = True
        return reject & positions

    drafts, res = _draft_runs(model, verifier=odd_positions, stability_threshold=0, confidence_threshold=10.0)
    assert drafts and all(not d.accepted[:, 1::2].any() for d in drafts)
    assert any(d.accepted[:, 0::2].any() for d in drafts)
    assert res.steps == [6]  # without the verifier these settings stop at the first confident step
    _, free = _draft_runs(model, stability_threshold=0, confidence_threshold=10.0)
    assert free.steps[0] < 6


def test_verifier_must_return_a_bool_mask(model):
    with pytest.raises(TypeError, match="bool tensor"):
        _draft_runs(model, verifier=lambda tokens, positions: positions.long())
    with pytest.raises(TypeError, match="callable"):
        _draft_runs(model, verifier=3)
