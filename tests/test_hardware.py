"""The compute dtype follows the hardware: 16-bit weights compute in fp32 on CPUs without native bf16."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma import hardware
from dgemma.checkpoint.write import write_random_checkpoint


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("hw") / "bf16", "tiny", seed=1, dtype="bfloat16")


def _pretend(monkeypatch, native: bool):
    flags = frozenset({"avx2", "avx512f"} | ({"avx512_bf16", "avx512_fp16"} if native else set()))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_default_compute_dtype(monkeypatch, stored):
    _pretend(monkeypatch, native=False)
    assert hardware.default_compute_dtype(stored, torch.device("cpu")) == torch.float32
    assert hardware.default_compute_dtype(torch.float32, "cpu") == torch.float32
    assert hardware.default_compute_dtype(stored, torch.device("cuda")) == stored  # GPUs do 16-bit natively
    _pretend(monkeypatch, native=True)
    assert hardware.default_compute_dtype(stored, "cpu") == stored


def test_bf16_flags_do_not_make_fp16_native(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.default_compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert hardware.default_compute_dtype(torch.float16, "cpu") == torch.float32


def test_amx_counts_as_native(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert hardware.cpu_has_native_bf16()


def test_no_cpuinfo_means_fp32(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset())
    assert hardware.default_compute_dtype(torch.bfloat16, "cpu") == torch.float32


def test_bf16_checkpoint_loads_in_fp32_without_native_bf16(monkeypatch, bf16_ckpt):
    _pretend(monkeypatch, native=False)
    model = dgemma.load_model(bf16_ckpt)
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.module.parameters())
    # The fp32 weights are the stored bf16 values, exactly.
    ref = dgemma.load_model(bf16_ckpt, dtype=torch.bfloat16)
    assert torch.equal(model.module.embed_tokens.weight, ref.module.embed_tokens.weight.float())
    # An explicit dtype still wins.
    assert dgemma.load_model(bf16_ckpt, dtype="bfloat16").dtype == torch.bfloat16


def test_bf16_checkpoint_keeps_bf16_with_native_bf16(monkeypatch, bf16_ckpt):
    _pretend(monkeypatch, native=True)
    assert dgemma.load_model(bf16_ckpt).dtype == torch.bfloat16
    assert dgemma.load_model(bf16_ckpt, dtype="float32").dtype == torch.float32


def test_describe_names_the_cpu():
    d = hardware.describe()
    assert isinstance(d["cpu"], str) and d["cpu"]
    assert d["native_bf16"] == hardware.cpu_has_native_bf16()
