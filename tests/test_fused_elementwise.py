"""The norm and the gated activation in the native extension (`numerics.rms_norm`, `numerics.gelu_mul` inside
`row_invariant()` on bf16 CPU tensors) against torch's composition, which stays the reference's arithmetic.

Stated tolerances: the norm's only difference is the order of its sum of squares, so on inputs whose squares sum
exactly in fp32 (small integers) it is torch's bits, and elsewhere at most one bf16 step apart, rarely; the
activation's tanh is the kernel's, so each value is within one bf16 step of torch's (or 2^-20 in the far left tail,
where both are about 0). Where the extension does not run, the dispatch tests still check that nothing outside
`row_invariant()`, nothing to differentiate and no fp32 tensor ever reaches it.
"""

from __future__ import annotations

import pytest
import torch

import dgemma.numerics as N
from dgemma.extension import available
from dgemma.numerics import gelu_mul, gelu_tanh, rms_norm, row_invariant


def _torch_norm(x, w, eps=1e-6):
    with row_invariant(False):
        return rms_norm(x, w, eps)


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 steps (same-sign finite values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


class _Refuses:
    def __getattr__(self, name):
        raise AssertionError(f"the native {name} ran where torch's composition must")


@pytest.mark.parametrize("where", ["outside", "grad", "fp32"])
def test_torch_composition_outside_generation(where, monkeypatch):
    monkeypatch.setattr(N, "extension", lambda: _Refuses())
    x = torch.randn(4, 48, dtype=torch.float32 if where == "fp32" else torch.bfloat16)
    w = torch.randn(48, dtype=x.dtype)
    if where == "grad":
        x.requires_grad_(True)
    with row_invariant(where != "outside"):
        y = rms_norm(x, w, 1e-6)
        z = gelu_mul(x, x.detach())
    assert y.dtype == x.dtype and z.shape == x.shape
    with torch.no_grad():
        assert torch.equal(y, _torch_norm(x, w)) and torch.equal(z, gelu_tanh(x) * x)


def test_no_extension_keeps_torch_composition(monkeypatch):
    monkeypatch.setattr(N, "extension", lambda: None)
    x = torch.randn(3, 40).bfloat16()
    with row_invariant():
        assert torch.equal(rms_norm(x, None, 1e-6), _torch_norm(x, None))
        assert torch.equal(gelu_mul(x, x), gelu_tanh(x) * x)


if available():

    @pytest.mark.parametrize("shape", [(256, 2816), (2, 7, 16, 256), (5, 40), (3, 1)])
    @pytest.mark.parametrize("scaled", [True, False])
    def test_norm_is_torch_bits_where_the_sum_is_exact(shape, scaled):
        g = torch.Generator().manual_seed(sum(shape))
        x = torch.randint(-16, 17, shape, generator=g).bfloat16()
        w = torch.randn(shape[-1], generator=g).bfloat16() if scaled else None
        with row_invariant():
            y = rms_norm(x, w, 1e-6)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        assert torch.equal(y, _torch_norm(x, w))

    def test_norm_of_random_rows_is_within_one_bf16_step_and_row_invariant():
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(512, 2816, generator=g) * 3).bfloat16()
        w = torch.randn(2816, generator=g).bfloat16()
        with row_invariant():
            y = rms_norm(x, w, 1e-6)
            alone = rms_norm(x[37:38], w, 1e-6)
            strided = rms_norm(x[:, :1408], w[:1408], 1e-6)  # rows 2816 apart, read in place
        steps = _bf16_steps(y, _torch_norm(x, w))
        assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 1e-3
        assert torch.equal(alone[0], y[37])
        with row_invariant():
            assert torch.equal(strided, rms_norm(x[:, :1408].contiguous(), w[:1408], 1e-6))

    def _close_to_torch(got: torch.Tensor, ref: torch.Tensor) -> None:
        err = (got.float() - ref.float()).abs()
        assert bool((err <= ref.float().abs() * 2.0 ** -8 + 2.0 ** -20).all()), float(err.max())

    def test_gelu_mul_over_the_whole_range_is_within_one_bf16_step():
        x = torch.linspace(-12, 12, 100_003).bfloat16()[None]
        up = torch.linspace(-3, 3, 100_003).bfloat16()[None]
        with row_invariant():
            got = gelu_mul(x, up)
        _close_to_torch(got, gelu_tanh(x) * up)

    def test_gelu_mul_reads_chunk_halves_and_writes_a_padded_buffer():
        g = torch.Generator().manual_seed(1)
        fused = (torch.randn(2, 33, 2 * 704, generator=g) * 2).bfloat16()
        gate, up = fused.chunk(2, dim=-1)  # [2, 33, 704] views, rows 1408 apart
        ref = gelu_tanh(gate) * up
        with row_invariant():
            got = gelu_mul(gate, up)
            buf = torch.full((80, 704), 7.0, dtype=torch.bfloat16)
            into = gelu_mul(gate.reshape(66, 704), up.reshape(66, 704), out=buf[:66])
        assert got.shape == gate.shape and got.is_contiguous()
        _close_to_torch(got, ref)
        assert float((got != ref).float().mean()) < 1e-2
        assert into.data_ptr() == buf.data_ptr() and torch.equal(buf[:66], got.reshape(66, 704))
        assert bool((buf[66:] == 7).all())  # nothing past the rows it was given
