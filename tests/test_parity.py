"""Numerical and sampling parity with the reference (transformers' DiffusionGemmaForBlockDiffusion).

fp32: canvas logits must agree to 1e-5 and generation must be token-identical for the same seed with
rng="reference" (dgemma then draws exactly what the reference draws after torch.manual_seed).
bf16: logits within a stated tolerance, generation only has to be sane.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from transformers import DiffusionGemmaConfig

import dgemma

from refmodels import build, edit_json, ref_generate

S, F = "sliding_attention", "full_attention"
SEEDS = (0, 1, 2)


@dataclass
class Case:
    text: dict[str, Any]
    canvas: int
    prompt_len: int
    new: int | None  # max_new_tokens; None = use generation_config.json's value on both sides
    ov: dict[str, Any] = field(default_factory=dict)  # per-call generation overrides, passed to both sides
    gen: dict[str, Any] | None = None  # generation_config.json contents (beyond eos [1, 5] / pad 0)
    layout: str = "saved"  # config.json as save_pretrained wrote it, or rewritten into another layout (REWRITES)
    early_stop: bool = False  # the case must exercise adaptive stopping and EOS (asserted)
    seed: int = 1


CASES: dict[str, Case] = {
    # The reference example: 2 sliding + 2 full layers, prompt (11) > sliding window (6) > ... canvas (8) < prompt,
    # 3 canvases (max_new_tokens 20 > canvas 8, not a multiple of it).
    "base": Case(text={}, canvas=8, prompt_len=11, new=20, ov=dict(max_denoising_steps=8)),
    # 6 heads / 3 KV heads (sliding), 1 KV head (full); top-1 routing; canvas (12) longer than prompt (5);
    # prompt longer than the window (4); a custom temperature schedule.
    "h6kv3_top1": Case(
        text=dict(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=4, layer_types=[S, S, F], num_experts=4, top_k_experts=1, moe_intermediate_size=16),
        canvas=12, prompt_len=5, new=30, ov=dict(max_denoising_steps=6, t_min=0.2, t_max=1.5),
    ),
    # 6 heads / 2 KV heads (sliding), 3 KV heads (full); top-3 of 6 experts; first layer full; the last layer is
    # given as sliding and forced to full by both sides; temperature schedule disabled (t_min = t_max = None).
    "h6kv2_top3": Case(
        text=dict(vocab_size=112, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, global_head_dim=24, num_global_key_value_heads=3,
                  sliding_window=5, layer_types=[F, S, S, S], num_experts=6, top_k_experts=3,
                  moe_intermediate_size=16),
        canvas=6, prompt_len=9, new=18, ov=dict(max_denoising_steps=10, t_min=None, t_max=None),
    ),
    # 3 heads / 1 KV head (sliding), 3 KV heads (full); window 3; canvas 4. No per-call overrides at all: every
    # setting (max_new_tokens, steps, entropy bound, temperatures) comes from generation_config.json.
    "h3kv1_gen_defaults": Case(
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=12, global_head_dim=16, num_global_key_value_heads=3,
                  sliding_window=3, layer_types=[S, F], num_experts=3, top_k_experts=2, moe_intermediate_size=16),
        canvas=4, prompt_len=7, new=None,
        gen=dict(max_new_tokens=10, max_denoising_steps=7, entropy_bound=0.3, t_min=0.5, t_max=0.7),
    ),
    # No per-layer overrides in config.json: layer_types omitted (default 5:1 pattern over 6 layers), no
    # per_layer_config / rope_parameters / num_global_key_value_heads, only global_head_dim (older layout).
    "legacy_layout": Case(
        text=dict(vocab_size=72, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=None,
                  sliding_window=8, layer_types=None, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
        canvas=8, prompt_len=20, new=16, ov=dict(max_denoising_steps=6), layout="legacy",
    ),
    # The release's depth: 30 layers, no layer_types given (the 5:1 pattern: full layers 5, 11, 17, 23, 29), saved by
    # the reference with zero-padded per_layer_config keys ("05", ...); tiny widths; prompt longer than the window.
    "depth30_saved": Case(
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=30, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=6, layer_types=None, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
        canvas=8, prompt_len=13, new=16, ov=dict(max_denoising_steps=5),
    ),
    # The same depth in the flat layout (global_head_dim / num_global_key_value_heads, no layer_types).
    "depth30_flat": Case(
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=30, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=6, layer_types=None, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
        canvas=8, prompt_len=9, new=16, ov=dict(max_denoising_steps=5), layout="flat", seed=3,
    ),
    # 12 layers with per_layer_config keys written without padding ("5", "11").
    "depth12_unpadded": Case(
        text=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=2,
                  sliding_window=5, layer_types=None, num_experts=3, top_k_experts=2, moe_intermediate_size=16),
        canvas=6, prompt_len=10, new=12, ov=dict(max_denoising_steps=4), layout="unpadded", seed=4,
    ),
    # Adaptive stopping + EOS: a 12-token vocabulary with a low temperature makes the argmax canvas settle, so rows
    # stop before max_denoising_steps; eos 7 shows up in some canvases but not all.
    "adaptive_eos": Case(
        text=dict(vocab_size=12, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, global_head_dim=16, num_global_key_value_heads=1,
                  sliding_window=4, layer_types=[S, F], num_experts=2, top_k_experts=1, moe_intermediate_size=16),
        canvas=8, prompt_len=6, new=40,
        ov=dict(max_denoising_steps=12, confidence_threshold=0.5, stability_threshold=1, entropy_bound=5.0,
                t_min=0.1, t_max=0.3, eos_token_id=[7]),
        early_stop=True,
    ),
    # stability_threshold=0: a row stops at its first confident step (mean entropy < 1.0), with a large entropy
    # bound; a per-call EOS id that replaces generation_config.json's [1, 5].
    "adaptive_stability0": Case(
        text=dict(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, global_head_dim=16, num_global_key_value_heads=2,
                  sliding_window=4, layer_types=[S, F], num_experts=3, top_k_experts=2, moe_intermediate_size=16),
        canvas=8, prompt_len=10, new=40,
        ov=dict(max_denoising_steps=9, confidence_threshold=1.0, stability_threshold=0, entropy_bound=5.0,
                t_min=0.15, t_max=0.6, eos_token_id=[4]),
        early_stop=True,
    ),
}



def _legacy_rewrite(cfg: dict) -> None:
    tc = cfg["text_config"]
    for key in ("layer_types", "per_layer_config", "rope_parameters"):
        del tc[key]
    tc["global_head_dim"] = 32


def _flat_rewrite(cfg: dict) -> None:
    tc = cfg["text_config"]
    full = next(iter(tc.pop("per_layer_config").values()))
    del tc["layer_types"]
    tc["global_head_dim"] = full["head_dim"]
    tc["num_global_key_value_heads"] = full.get("num_key_value_heads")


def _unpadded_rewrite(cfg: dict) -> None:
    tc = cfg["text_config"]
    assert any(k.startswith("0") for k in tc["per_layer_config"])  # the reference padded them
    tc["per_layer_config"] = {str(int(k)): v for k, v in tc["per_layer_config"].items()}


REWRITES = {"legacy": _legacy_rewrite, "flat": _flat_rewrite, "unpadded": _unpadded_rewrite}


class Zoo:
    """Builds each case's reference model + checkpoint on first use, once per module."""

    def __init__(self, root):
        self.root = root
        self.models: dict[str, tuple] = {}

    def get(self, name: str):
        if name not in self.models:
            case = CASES[name]
            ref, ckpt = build(self.root, name, case.text, case.canvas, case.seed, gen=case.gen)
            if case.layout != "saved":
                edit_json(ckpt / "config.json", REWRITES[case.layout])
                # The rewritten file must still describe the same model to the reference.
                reread = DiffusionGemmaConfig.from_pretrained(ckpt).text_config
                assert reread.layer_types == ref.config.text_config.layer_types
                per_layer = lambda c: {int(k): v for k, v in c.to_dict()["per_layer_config"].items()}  # noqa: E731
                assert per_layer(reread) == per_layer(ref.config.text_config)
            dm = dgemma.load_model(ckpt)
            self.models[name] = (case, ref, dm, ckpt)
        return self.models[name]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("parity"))


def _prompt(case: Case, batch: int, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + salt)
    return torch.randint(0, case.text.get("vocab_size", 96), (batch, case.prompt_len), generator=g)


def _vocab(case: Case) -> int:
    return case.text.get("vocab_size", 96)


def _eos(case: Case, ref) -> list[int]:
    eos = case.ov.get("eos_token_id", ref.generation_config.eos_token_id)
    return [eos] if isinstance(eos, int) else list(eos)


def _new_kw(case: Case) -> dict:
    return {} if case.new is None else {"max_new_tokens": case.new}


# ---------------------------------------------------------------------------------------------------------------
# canvas logits
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch", [1, 2])
def test_canvas_logits_fp32(zoo, name, batch):
    case, ref, dm, _ = zoo.get(name)
    assert dm.dtype == torch.float32
    vocab = _vocab(case)
    g = torch.Generator().manual_seed(7 + batch)
    prompt = _prompt(case, batch, salt=batch)
    canvas = torch.randint(0, vocab, (batch, case.canvas), generator=g)
    sc = 3 * torch.randn(batch, case.canvas, vocab, generator=g)
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        want_sc = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    got = dm.canvas_logits(prompt, canvas)
    got_sc = dm.canvas_logits(prompt, canvas, self_conditioning_logits=sc)
    assert got.shape == want.shape == (batch, case.canvas, vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_sc, want_sc, atol=1e-5, rtol=0)
    # Self-conditioning must actually change the logits (else the comparison above proves little).
    assert (want_sc - want).abs().max() > 1e-2


def test_canvas_logits_batch_rows_are_independent(zoo):
    """Row b of a batched call equals the same prompt run alone (no cross-row leakage in cache or experts)."""
    case, ref, dm, _ = zoo.get("base")
    prompt = _prompt(case, 2, salt=5)
    canvas = torch.randint(0, _vocab(case), (2, case.canvas), generator=torch.Generator().manual_seed(5))
    both = dm.canvas_logits(prompt, canvas)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], dm.canvas_logits(prompt[b:b + 1], canvas[b:b + 1]),
                                   atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------
class _ForwardCounter:
    """Counts the reference's decoder passes (generate() looks up self.forward at call time)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.orig = model.forward

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return self.orig(*args, **kwargs)

        self.model.forward = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward


def _check_single(case, ref, dm, prompt, seed):
    with _ForwardCounter(ref) as counter:
        if case.new is None:
            ids, tpf, out = ref_generate_default(ref, prompt, seed)
        else:
            ids, tpf, out = ref_generate(ref, prompt, case.new, seed, **case.ov)
    g = dm.generate(prompt, seed=seed, rng="reference", **_new_kw(case), **case.ov)
    ref_ids, ref_tpf = ids[0], tpf[0]
    eos = _eos(case, ref)
    assert g.ids == ref_ids, f"seed {seed}"
    assert g.tokens_per_forward == ref_tpf, f"seed {seed}"
    assert g.seed == seed
    # decoder passes: counted on the reference, and implied by its tokens_per_forward
    assert sum(g.steps) == counter.calls
    assert sum(g.steps) == round(len(ref_ids) / ref_tpf)
    # one entry per canvas the reference produced
    assert len(g.steps) == (out.sequences.shape[1] - prompt.shape[1]) // case.canvas
    max_steps = case.ov.get("max_denoising_steps", ref.generation_config.max_denoising_steps)
    assert all(1 <= s <= max_steps for s in g.steps)
    ended_eos = any(t in eos for t in ref_ids)
    assert g.finish_reason == ("eos" if ended_eos else "length")
    if ended_eos:
        assert g.ids[-1] in eos and sum(t in eos for t in g.ids) == 1
    return g


def ref_generate_default(ref, prompt, seed):
    """Reference run with nothing passed: every setting from generation_config.json."""
    torch.manual_seed(seed)
    r = ref.generate(prompt)
    new = r.sequences[0, prompt.shape[1]:]
    new = new[new != ref.generation_config.pad_token_id]
    return [new.tolist()], [r.tokens_per_forward.item()], r


@pytest.mark.parametrize("name", list(CASES))
def test_generate_parity(zoo, name):
    case, ref, dm, _ = zoo.get(name)
    prompt = _prompt(case, 1)
    results = [_check_single(case, ref, dm, prompt, s) for s in SEEDS]
    if case.early_stop:
        max_steps = case.ov["max_denoising_steps"]
        eos = _eos(case, ref)
        steps = [s for g in results for s in g.steps]
        assert any(s < max_steps for s in steps), steps  # adaptive stopping fired
        assert any(g.finish_reason == "eos" and g.ids[-1] in eos for g in results)  # EOS path
        assert any(len(g.steps) > 1 for g in results)  # and a later canvas (commit + re-encode) too


@pytest.mark.parametrize("name", ["base", "adaptive_eos", "adaptive_stability0"])
def test_generate_parity_batch(zoo, name):
    """Batch of 2: rows stop denoising and finish (EOS) at different times; per-row ids and tokens/forward match."""
    case, ref, dm, _ = zoo.get(name)
    prompt = _prompt(case, 2, salt=3)
    saw_split = False
    for seed in SEEDS:
        ids, tpf, _ = ref_generate(ref, prompt, case.new, seed, **case.ov)
        outs = dm.generate(prompt, max_new_tokens=case.new, seed=seed, rng="reference", **case.ov)
        assert isinstance(outs, list) and len(outs) == 2
        for b in range(2):
            assert outs[b].ids == ids[b], f"seed {seed} row {b}"
            assert outs[b].tokens_per_forward == tpf[b], f"seed {seed} row {b}"
            assert sum(outs[b].steps) == round(len(ids[b]) / tpf[b])
        saw_split |= outs[0].steps != outs[1].steps
    if case.early_stop:
        assert saw_split  # rows really did stop / finish at different times


# ---------------------------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------------------------
BF16_CASES = {
    "bf16_top1": dict(top_k_experts=1),
    "bf16_top2": {},  # the base config
    # a vocabulary of whole 256-row chunks and a hidden size of whole 64-column strips: the shapes dgemma's native
    # self-conditioning product covers (the real model's 262144 x 2816 is one), where the CPU has the native kernel;
    # long enough sums that another summation order shows (measured: mean |diff| 0.045 with that product)
    "bf16_native_sc": dict(top_k_experts=1, vocab_size=32000, hidden_size=512),
}

# Tolerance. Both sides compute in bf16 with the same ops and the same CPU kernels, and both softcap the fp32
# logits to +-30, so a faithful port agrees bit for bit (measured: max |diff| = 0.0 on the top-1 model, with and
# without self-conditioning). We still allow 4 bf16 ulps at the top of the softcapped range (ulp(16..32) = 0.125
# -> 0.5) so a harmless reordering of one op does not fail the test, and require the mean |diff| to stay below
# 0.02 (< 1 ulp of a typical |logit| of 2..8), which an op that rounds differently everywhere would break.
# For scale: the bf16 reference itself is up to ~2 away from the fp32 result on these random models, and the
# divergences this test caught during development (MoE sum order, softmax of bf16-cast self-conditioning logits)
# measured max 0.2-2.4 / mean 0.04-0.16.
BF16_MAX, BF16_MEAN = 0.5, 0.02


@pytest.fixture(scope="module")
def bf16_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for name, text in BF16_CASES.items():
        ref, ckpt = build(root, name, text, canvas_length=8, seed=2, dtype=torch.bfloat16)
        out[name] = (ref, dgemma.load_model(ckpt, dtype=torch.bfloat16), ckpt)  # bf16 even without native bf16
    return out


def _bf16_inputs(batch, salt):
    g = torch.Generator().manual_seed(50 + salt)
    prompt = torch.randint(0, 96, (batch, 11), generator=g)
    canvas = torch.randint(0, 96, (batch, 8), generator=g)
    sc = 3 * torch.randn(batch, 8, 96, generator=g)
    return prompt, canvas, sc


def _assert_bf16_close(got, want):
    diff = (got - want).abs()
    assert diff.max().item() <= BF16_MAX, f"max |diff| {diff.max().item()}"
    assert diff.mean().item() <= BF16_MEAN, f"mean |diff| {diff.mean().item()}"


def test_bf16_checkpoint_loads_as_bf16(bf16_zoo):
    ref, dm, ckpt = bf16_zoo["bf16_top1"]
    assert '"dtype": "bfloat16"' in (ckpt / "config.json").read_text()
    assert dm.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in dm.module.parameters())
    assert next(ref.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("batch", [1, 2])
def test_canvas_logits_bf16(bf16_zoo, batch):
    ref, dm, _ = bf16_zoo["bf16_top1"]
    prompt, canvas, sc = _bf16_inputs(batch, batch)
    # Self-conditioning logits that bf16 represents exactly (test_canvas_logits_bf16_fp32_self_conditioning
    # covers general fp32 ones).
    sc = sc.bfloat16().float()
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        want_sc = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    got, got_sc = dm.canvas_logits(prompt, canvas), dm.canvas_logits(prompt, canvas, sc)
    assert got.dtype == torch.float32 and got.abs().max() <= 30
    _assert_bf16_close(got, want)
    _assert_bf16_close(got_sc, want_sc)


def test_canvas_logits_bf16_self_conditioning_at_native_shapes(bf16_zoo):
    """One step's logits keep the reference's bits at shapes the native self-conditioning product covers: that
    product (another summation order) serves generation only, inside row_invariant()."""
    ref, dm, _ = bf16_zoo["bf16_native_sc"]
    v = dm.config.vocab_size
    g = torch.Generator().manual_seed(77)
    prompt, canvas = torch.randint(0, v, (2, 11), generator=g), torch.randint(0, v, (2, 8), generator=g)
    sc = (3 * torch.randn(2, 8, v, generator=g)).bfloat16().float()
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    _assert_bf16_close(dm.canvas_logits(prompt, canvas, sc), want)


def test_canvas_logits_bf16_top2_experts(bf16_zoo):
    ref, dm, _ = bf16_zoo["bf16_top2"]
    for salt in range(3):
        prompt, canvas, _ = _bf16_inputs(2, 10 + salt)
        with torch.no_grad():
            want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        _assert_bf16_close(dm.canvas_logits(prompt, canvas), want)


def test_canvas_logits_bf16_fp32_self_conditioning(bf16_zoo):
    ref, dm, _ = bf16_zoo["bf16_top1"]
    for salt in range(3):
        prompt, canvas, sc = _bf16_inputs(2, 20 + salt)
        with torch.no_grad():
            want = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        _assert_bf16_close(dm.canvas_logits(prompt, canvas, sc), want)


@pytest.mark.parametrize("rng", ["reference", "fast"])
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_generate_bf16_is_sane(bf16_zoo, name, rng):
    ref, dm, _ = bf16_zoo[name]
    prompt = _bf16_inputs(1, 30)[0]
    for seed in SEEDS:
        g = dm.generate(prompt, max_new_tokens=20, seed=seed, max_denoising_steps=6, rng=rng)
        assert g.ids and all(0 <= t < dm.config.vocab_size for t in g.ids)
        assert 0 < g.tokens_per_forward <= 8  # at most one canvas per pass
        assert 1 <= len(g.steps) <= 3 and all(1 <= s <= 6 for s in g.steps)
        assert g.tokens_per_forward == pytest.approx(len(g.ids) / sum(g.steps), rel=1e-6)
        assert g.finish_reason in ("eos", "length")
        if g.finish_reason == "eos":
            assert g.ids[-1] in (1, 5)
        # deterministic for a seed
        assert dm.generate(prompt, max_new_tokens=20, seed=seed, max_denoising_steps=6, rng=rng).ids == g.ids
