"""The fast sampler draws from exactly the distributions the reference sampler draws from."""

import math

import pytest
import torch

from dgemma import sampler
from dgemma.sampler import NATIVE_MIN_VOCAB, accept_mask, entropy, fast_sample, temperature


def chi2_threshold(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 4.75 is a one-sided p of about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def draw_many(logits_row: torch.Tensor, n: int, temp=None, seed: int = 0) -> torch.Tensor:
    v = logits_row.numel()
    logits = logits_row.expand(1, n, v).clone()
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(1, n, generator=g, dtype=torch.float64)
    sampled, _, _ = fast_sample(logits, None, temp, u, torch.ones(1, dtype=torch.bool))
    return sampled[0]


@pytest.mark.parametrize("temp", [None, 0.5, 1.7])
def test_frequencies_match_probabilities(temp):
    torch.manual_seed(1)
    v, n = 40, 200_000
    row = torch.randn(v) * 2
    row[3] = float("-inf")  # a token with no mass must never be drawn
    samples = draw_many(row, n, temp)
    counts = torch.bincount(samples, minlength=v).double()
    probs = torch.softmax(row / (temp or 1.0), dim=-1).double()
    assert counts[3] == 0
    mask = probs > 0
    expected = probs[mask] * n
    chi2 = float(((counts[mask] - expected) ** 2 / expected).sum())
    assert chi2 < chi2_threshold(int(mask.sum()) - 1), chi2
    # and the same test catches a sampler that ignores the temperature
    if temp is not None:
        wrong = torch.softmax(row, dim=-1).double()[mask] * n
        assert float(((counts[mask] - wrong) ** 2 / wrong).sum()) > chi2_threshold(int(mask.sum()) - 1)


def test_matches_multinomial_distribution():
    """Frequencies of the fast draw and of torch.multinomial (the reference) agree (two-sample chi-square)."""
    torch.manual_seed(2)
    v, n = 25, 100_000
    row = torch.randn(v)
    fast = torch.bincount(draw_many(row, n, seed=5), minlength=v).double()
    g = torch.Generator().manual_seed(7)
    ref = torch.multinomial(torch.softmax(row, -1).expand(n, v), 1, generator=g).squeeze(-1)
    ref = torch.bincount(ref, minlength=v).double()
    chi2 = float(((fast - ref) ** 2 / (fast + ref).clamp_min(1)).sum())
    assert chi2 < chi2_threshold(v - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_argmax_probs_match_reference_math(dtype):
    torch.manual_seed(3)
    b, c, v = 2, 37, 1000
    raw = (torch.randn(b, c, v) * 40).to(dtype)  # large enough that the softcap matters
    t = temperature(7, 10, 0.4, 0.8)
    processed = torch.tanh(raw.float() / 30.0) * 30.0 / t  # the reference: fp32 softcap, then temperature
    probs_out = torch.zeros(b, c, v, dtype=dtype)
    before = raw.clone()
    u = torch.rand(b, c, dtype=torch.float64)
    sampled, argmax, h = fast_sample(raw, 30.0, t, u, torch.ones(b, dtype=torch.bool), probs_out)
    assert torch.equal(raw, before)  # the head output is not modified
    assert torch.equal(argmax, processed.argmax(-1))
    assert torch.allclose(h, entropy(processed), atol=1e-5)
    want = torch.softmax(processed, -1).to(dtype)
    assert torch.allclose(probs_out.float(), want.float(), atol=1e-7 if dtype == torch.float32 else 4e-3)
    assert sampled.min() >= 0 and sampled.max() < v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap, temp", [(30.0, 0.7), (None, 0.7), (30.0, None), (None, None)])
def test_16bit_table_path_is_bit_identical(dtype, cap, temp):
    """16-bit head outputs go through a 65536-entry table of scaled logits; every result (draws, argmax, entropy,
    probabilities) must equal the direct fp32 path on the same values, bit for bit, including inf/-inf/0 codes."""
    torch.manual_seed(5)
    b, c, v = 2, 9, 3000
    raw = (torch.randn(b, c, v) * 40).to(dtype)
    raw[0, 0, :3] = torch.tensor([float("inf"), float("-inf"), -0.0], dtype=dtype)
    u = torch.rand(b, c, dtype=torch.float64)
    rows = torch.ones(b, dtype=torch.bool)
    t = torch.tensor(temp) if temp is not None else None
    table_probs, direct_probs = torch.zeros(b, c, v, dtype=dtype), torch.zeros(b, c, v, dtype=dtype)
    got = fast_sample(raw, cap, t, u, rows, table_probs)
    want = fast_sample(raw.float(), cap, t, u, rows, direct_probs)  # fp32 input: the per-element path
    for g, w in zip(got, want):  # (without a softcap the inf row's entropy is nan on both paths)
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(table_probs, direct_probs, rtol=0, atol=0, equal_nan=True)


def test_skipped_rows_are_untouched():
    b, c, v = 3, 5, 64
    logits = torch.randn(b, c, v)
    probs_out = torch.full((b, c, v), 7.0)
    rows = torch.tensor([True, False, True])
    sampled, argmax, h = fast_sample(logits, None, 0.5, torch.rand(b, c, dtype=torch.float64), rows, probs_out)
    assert torch.equal(probs_out[1], torch.full((c, v), 7.0))
    assert torch.allclose(probs_out[0], torch.softmax(logits[0] / 0.5, -1))
    assert float(h[1].abs().sum()) == 0 and float(h[0].min()) > 0


def test_acceptance_rule():
    h = torch.tensor([[0.5, 0.01, 0.3, 2.0, 0.02]])
    # sorted: 0.01, 0.02, 0.3, 0.5, 2.0; cumsum - current: 0, 0.01, 0.03, 0.33, 0.83
    assert accept_mask(h, 0.1).tolist() == [[False, True, True, False, True]]
    assert accept_mask(h, 0.5).tolist() == [[True, True, True, False, True]]
    assert accept_mask(h, 1e-9).tolist() == [[False, True, False, False, False]]  # the minimum is always taken


def test_sampler_memory_at_real_vocab():
    """At V = 262144 the fused sampler works in chunks: its temporaries stay far below one [1, 256, V] tensor."""
    v, c = 262144, 256
    logits = torch.randn(1, c, v)
    probs_out = torch.zeros(1, c, v)
    one = logits.numel() * 4

    def hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = hwm()
    fast_sample(logits, 30.0, 0.7, torch.rand(1, c, dtype=torch.float64), torch.ones(1, dtype=torch.bool), probs_out)
    assert hwm() - base < one // 8


@pytest.mark.parametrize("dtype, probs_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_native_sampler_at_a_large_vocabulary_draws_from_the_same_distribution(dtype, probs_dtype, monkeypatch):
    """From NATIVE_MIN_VOCAB on, 16-bit head outputs go through the fused native kernel where it runs (its own exp
    and summation order): the same argmax, entropies and probabilities to fp32 rounding, each draw the inverse CDF
    of its uniform, and rows that are not live untouched. Elsewhere the torch ops run and this compares them with
    themselves."""
    torch.manual_seed(11)
    b, c, v = 2, 6, NATIVE_MIN_VOCAB
    raw = (torch.randn(b, c, v) * 20).to(dtype)
    u = torch.rand(b, c, dtype=torch.float64)
    rows = torch.tensor([True, False])
    fast, ref = torch.full((b, c, v), 7.0, dtype=probs_dtype), torch.full((b, c, v), 7.0, dtype=probs_dtype)
    got = fast_sample(raw, 30.0, 0.7, u, rows, fast)
    monkeypatch.setattr(sampler, "NATIVE_MIN_VOCAB", v + 1)
    want = fast_sample(raw, 30.0, 0.7, u, rows, ref)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-4)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    assert torch.equal(fast[1], ref[1]) and float(got[2][1].abs().sum()) == 0 and int(got[0][1].abs().sum()) == 0
    p = ref[0].double()
    cdf = p.cumsum(-1)
    target = u[0] * cdf[:, -1]
    s = got[0][0]
    above = cdf.gather(1, s[:, None]).squeeze(1)
    below = torch.where(s > 0, cdf.gather(1, (s - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(above))
    assert torch.all(below <= target + 1e-4) and torch.all(target <= above + 1e-4)
    assert torch.all(p.gather(1, s[:, None]) > 0)


def test_native_sampler_takes_padded_head_rows_as_they_are():
    """The native LM head pads its output rows (a view with a row stride past V): the fused sampler reads such
    evenly spaced rows in place and gives what it gives on a contiguous copy, bit for bit."""
    torch.manual_seed(12)
    b, c, v = 2, 3, NATIVE_MIN_VOCAB
    padded = (torch.randn(b * c, v + 32) * 20).to(torch.bfloat16)
    raw = padded[:, :v].reshape(b, c, v)
    assert not raw.is_contiguous()
    u = torch.rand(b, c, dtype=torch.float64)
    rows = torch.ones(b, dtype=torch.bool)
    got_probs, want_probs = torch.zeros(b, c, v, dtype=torch.bfloat16), torch.zeros(b, c, v, dtype=torch.bfloat16)
    got = fast_sample(raw, 30.0, 0.7, u, rows, got_probs)
    want = fast_sample(raw.contiguous(), 30.0, 0.7, u, rows, want_probs)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and torch.equal(got_probs, want_probs)
