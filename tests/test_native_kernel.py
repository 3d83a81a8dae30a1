"""The native kernel's tile layout and its outputs.

The layout tests are pure torch and run everywhere: a QTensor repacked into tiles dequantizes to exactly the same
weight as the QTensor it came from (int4, NVFP4, FP8 per channel and per block). Where the kernel runs (a CPU with
AVX-512 BF16 and a compiler), every test runs on each engine the CPU has (AMX, AVX-512 BF16), and its products are
checked against the bf16 weight the format dequantizes to: the expansion is the same bf16 rounding (for NVFP4 that
rounding is exact), the accumulation is fp32 in another order, so the stated tolerance is fp32 rounding of a K-term
sum (|error| <= 1e-5 x sum |x| |w|). At most `SMALL_ROWS` rows (int4, NVFP4), and for int4 at most `EXACT_ROWS`,
the kernel multiplies the unrounded fp32 weight instead, held to the same bound against it. The fp32 engine (fp32
activations, any CPU with AVX2) multiplies the unrounded fp32 weight at every row count, each row's sum in one
order whatever the rows around it (bit for bit). Where no engine runs, loading leaves every QTensor as it was read.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil

import pytest
import torch

import dgemma.quant.lowbit as L
from dgemma import load_model
from dgemma.checkpoint.formats import FP8BlockTensor, FP8ChannelTensor, NVFP4Tensor
from dgemma import extension
from dgemma.checkpoint.quantize import random_quantized_checkpoint
from dgemma.hardware import cpu_flags
from dgemma.numerics import row_invariant
from dgemma.quant import native
from dgemma.quant.kernels import pack_int4
from dgemma.quant.modules import QExperts, QLinear

GEN = torch.Generator().manual_seed(0)


def _int4(shape, group=64):
    w = torch.randn(*shape, generator=GEN) * 0.05
    return L.Int4Tensor(*L.quantize_int4(w, group), group, False, shape=shape)


def _nvfp4(shape, divides=False):
    *lead, n, k = shape
    codes = torch.randint(0, 16, (*lead, n, k), generator=GEN, dtype=torch.uint8)
    scale = (torch.rand(*lead, n, k // 16, generator=GEN) * 2 + 0.01).to(torch.float8_e4m3fn)
    scale.view(-1)[:3] = torch.tensor([0.0, 2.0 ** -9, 448.0]).to(torch.float8_e4m3fn)  # zero, subnormal, largest
    gs = torch.rand(*lead, n, generator=GEN) + 0.5
    return NVFP4Tensor(pack_int4(codes), scale, gs, divides, shape=tuple(shape))


def _fp8_codes(shape):
    w = (torch.randn(*shape, generator=GEN) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    w.view(-1)[:2] = torch.tensor([2.0 ** -9, -0.0]).to(torch.float8_e4m3fn)  # subnormal, negative zero
    return w


def _fp8_channel(shape):
    return FP8ChannelTensor(_fp8_codes(shape), torch.rand(*shape[:-1], 1, generator=GEN).to(torch.bfloat16),
                            shape=tuple(shape))


def _fp8_block(shape, rows=24, block=64):
    *lead, n, k = shape
    grid = torch.rand(*lead, -(-n // rows), k // block, generator=GEN) * 0.01
    return FP8BlockTensor(_fp8_codes(shape), grid, torch.arange(n) // rows, block, shape=tuple(shape))


MAKERS = {
    "int4-g64": lambda s: _int4(s, 64),
    "int4-g32": lambda s: _int4(s, 32),
    "nvfp4": _nvfp4,
    "nvfp4-divides": lambda s: _nvfp4(s, True),
    "fp8-channel": _fp8_channel,
    "fp8-block": _fp8_block,
}


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("shape", [(48, 128), (3, 64, 192)])
def test_tiles_dequantize_to_the_same_weight(kind, shape, monkeypatch):
    q = MAKERS[kind](shape)
    monkeypatch.setattr(native, "extension", lambda: None)  # the torch repack, on every machine
    monkeypatch.setattr(native, "fp32_extension", lambda: None)
    t = native.to_tiles(q)
    assert t is not None and t.scheme == q.scheme and t.shape == q.shape
    assert torch.equal(t.dequantize(torch.float32), q.dequantize(torch.float32))
    assert torch.equal(t.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    if len(shape) == 3:
        assert torch.equal(t.dequantize(torch.float32, index=2), q.dequantize(torch.float32, index=2))


def test_tile_order_is_amx_vnni():
    """Element e of row r of tile (nb, kb) is W[16 nb + e // 2, 32 kb + 2 r + e % 2]."""
    n, k = 32, 64
    w = torch.arange(n * k).view(n, k)
    tiles = native._tile_order(w)
    nb, kb, r, e = 1, 1, 5, 7
    assert tiles[nb, kb, r, e].item() == w[16 * nb + e // 2, 32 * kb + 2 * r + e % 2].item()
    assert torch.equal(native._untile(tiles, n, k), w)


def test_uncovered_shapes_stay_as_read():
    assert native.to_tiles(_int4((40, 128))) is None  # 40 columns: not whole tiles
    assert native.to_tiles(_fp8_block((48, 128), block=16)) is None  # FP8 blocks must be whole tiles
    dense = L.Dense16Tensor(torch.randn(16, 32).to(torch.bfloat16), shape=(16, 32))
    assert native.adopt(dense) is dense


def _reference(q, x, index=None, rounded=True):
    """x @ W.T in fp32 with W the format's weight rounded to bf16 (the AMX path's expansion), or unrounded (the
    few-rows path); NVFP4's global scale applies to the output in fp32 either way."""
    dtype = torch.bfloat16 if rounded else torch.float32
    if isinstance(q, NVFP4Tensor):
        gs = q.global_scale if index is None else q.global_scale[index]
        unscaled = NVFP4Tensor(q.packed, q.scale, torch.ones_like(q.global_scale), shape=q.shape)
        y = x.float() @ unscaled.dequantize(dtype, index).float().t()
        return y / gs if q.global_divides else y * gs
    return x.float() @ q.dequantize(dtype, index).float().t()


def _bound(q, x, index=None):
    """fp32 rounding of a K-term sum: 1e-5 x sum |x| |w|."""
    w = q.dequantize(torch.float32, index).abs()
    return 1e-5 * (x.float().abs() @ w.t()) + 1e-30


def _unrounded(q, rows):
    """Whether `rows` rows take a path with unrounded weights: the dot-product path (int4, NVFP4) or int4's
    group-scaled one."""
    if isinstance(q, (FP8ChannelTensor, FP8BlockTensor)):
        return False
    return rows <= (native.SMALL_ROWS if isinstance(q, NVFP4Tensor) else native.EXACT_ROWS)


def _batched_equals_alone(model) -> None:
    """The model's experts run on a kernel, and each row of a batch equals the same prompt and seed alone."""
    assert any(isinstance(m, QExperts) and isinstance(m.gate_up, native.TileTensor) for m in model.module.modules())
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    kw = dict(max_new_tokens=32, max_denoising_steps=6)
    batch = model.generate(prompts, seed=7, **kw)
    for i, p in enumerate(prompts):
        solo = model.generate(p, seed=7 + i, **kw)
        assert solo.ids == batch[i].ids and solo.steps == batch[i].steps


def test_the_kernel_runs_wherever_it_can_be_built():
    """A build failure must not pass silently as "this machine has no AMX": where the CPU has the flags and the
    builder has a compiler and ninja (the dev extras), the kernel is there."""
    buildable = (platform.system() == "Linux" and platform.machine() == "x86_64"
                 and all(f in cpu_flags() for f in extension.FLAGS)
                 and shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
                 and os.environ.get("DGEMMA_NATIVE", "auto") != "0")
    assert native.available() == buildable


if native.available():

    @pytest.fixture(autouse=True, params=native.engines())
    def engine(request):
        """Each kernel test on every engine this CPU runs."""
        with native.use_engine(request.param):
            yield request.param

    def test_a_built_kernel_is_found_in_the_cache():
        """The first-build notice checks torch's extension cache; once built, it is there."""
        from torch.utils import cpp_extension

        assert extension._built_before(cpp_extension)

    def test_engines_switch_and_come_back(engine):
        assert native.engine() == engine  # the fixture's
        for name in native.engines():
            with native.use_engine(name):
                assert native.engine() == name
        assert native.engine() == engine
        with pytest.raises(native.QuantError, match="cannot run here"):
            with native.use_engine("tpu"):
                pass

    @pytest.mark.parametrize("kind", MAKERS)
    @pytest.mark.parametrize("rows", [1, 4, 5, 16, 17, 32, 33, 40, 70])
    def test_kernel_matches_the_dequantized_weight(kind, rows):
        q = MAKERS[kind]((48, 128))
        t = native.to_tiles(q)
        x = torch.randn(rows, 128, generator=GEN).to(torch.bfloat16)
        got = t.linear(x).float()
        want = _reference(q, x, rounded=not _unrounded(q, rows))
        assert torch.all((got - want).abs() <= _bound(q, x) + 2 ** -8 * want.abs())  # bf16 output rounding
        with row_invariant():  # one path for every row count: the AMX path's rounded weights
            got = t.linear(x).float()
        want = _reference(q, x)
        assert torch.all((got - want).abs() <= _bound(q, x) + 2 ** -8 * want.abs())

    @pytest.mark.parametrize("bits", [4, 8])
    def test_native_repack_is_the_torch_layout(bits):
        packed = torch.randint(0, 256, (3, 48, 64 if bits == 4 else 128), generator=GEN, dtype=torch.uint8)
        assert torch.equal(native._tiles(packed, bits), native._tiles(packed, bits, native=False))
        assert torch.equal(native._tiles(packed[1], bits), native._tiles(packed[1], bits, native=False))

    @pytest.mark.parametrize("kind", ["int4-g32", "nvfp4", "fp8-block"])
    def test_grouped_experts_match_one_at_a_time(kind):
        q = MAKERS[kind]((4, 64, 128 if kind == "fp8-block" else 96))
        t = native.to_tiles(q)
        counts = torch.tensor([3, 0, 33, 16])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        x = torch.randn(int(counts.sum()), q.shape[-1], generator=GEN).to(torch.bfloat16)
        got = t.grouped(x, offsets)
        for e in range(4):
            rows = x[offsets[e]:offsets[e + 1]]
            want = _reference(q, rows, e, rounded=not _unrounded(q, len(rows)))
            assert torch.all((got[offsets[e]:offsets[e + 1]] - want).abs() <= _bound(q, rows, e)), e
            # each row's result is the same whatever rows share its call (row invariance, bit for bit)
            assert torch.equal(got[offsets[e]:offsets[e + 1]], t.grouped(rows, torch.tensor([0, len(rows)]), only=e))

    @pytest.mark.parametrize("kind", ["int4-g64", "int4-g32", "nvfp4"])
    def test_experts_inside_row_invariant_take_one_path_for_every_row_count(kind):
        """The default sampler's mode: a row's result is the same alone or among any rows (bit for bit), and int4
        experts use the unrounded weight at every count (group-scaled), other formats the rounded one."""
        q = MAKERS[kind]((3, 64, 128))
        t = native.to_tiles(q)
        counts = torch.tensor([40, 2, 17])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        x = torch.randn(int(counts.sum()), 128, generator=GEN).to(torch.bfloat16)
        with row_invariant():
            got = t.grouped(x, offsets)
            for e in range(3):
                rows = x[offsets[e]:offsets[e + 1]]
                want = _reference(q, rows, e, rounded=not kind.startswith("int4"))
                assert torch.all((got[offsets[e]:offsets[e + 1]] - want).abs() <= _bound(q, rows, e)), e
                for r in (int(offsets[e]), int(offsets[e + 1]) - 1):
                    alone = t.grouped(x[r:r + 1], torch.tensor([0, 1]), only=e)
                    assert torch.equal(got[r:r + 1], alone), (e, r)

    def test_a_quantized_model_generates_the_same_batched_and_alone(tmp_path):
        """End to end through the kernel (int4 experts group-scaled, dense projections scaled): each row of a
        batch equals the same prompt and seed generated alone."""
        path = random_quantized_checkpoint(tmp_path / "m", "tiny", "int4", seed=1, std=0.3, group=32, progress=False,
                                           dtype="bfloat16", canvas_length=16)
        _batched_equals_alone(load_model(path, dtype="bfloat16"))

    @pytest.mark.parametrize("kind", ["int4-g32", "nvfp4"])
    def test_experts_native_combine_is_the_torch_arithmetic(kind):
        """The AMX branch gathers into padded buffers and sums the k choices natively: the same bits as the kernel's
        outputs rounded to bf16, weighted in fp32, scattered to token order and summed over k with torch ops."""
        experts = QExperts(MAKERS[kind]((6, 64, 96)), MAKERS[kind]((6, 96, 32)))
        assert isinstance(experts.gate_up, native.TileTensor)
        x = (torch.randn(37, 96, generator=GEN) * 3).to(torch.bfloat16)
        idx = torch.stack([torch.randperm(6, generator=GEN)[:3] for _ in range(37)])
        weights = torch.rand(37, 3, generator=GEN)
        weights[0, 1] = 0.0
        got = experts(x, weights, idx)
        _, perm = torch.sort(idx.reshape(-1))
        counts = torch.bincount(idx.reshape(-1), minlength=6)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        xs = x.index_select(0, perm // 3)
        gate, up = experts.gate_up.grouped(xs, offsets).to(torch.bfloat16).chunk(2, dim=-1)
        out = experts.down.grouped(torch.nn.functional.gelu(gate, approximate="tanh") * up, offsets)
        weighted = out.to(torch.bfloat16).float().mul_(weights.reshape(-1).index_select(0, perm).unsqueeze(-1))
        by_token = torch.empty_like(weighted).index_copy_(0, perm, weighted)
        assert torch.equal(got, by_token.view(37, 3, -1).sum(dim=1).to(torch.bfloat16))

    def test_the_kernel_refuses_too_few_rows_for_its_tiles():
        t = native.to_tiles(_int4((48, 128)))
        x = torch.randn(17, 128, generator=GEN).to(torch.bfloat16)  # 17 rows: the tiles read 32
        with pytest.raises(RuntimeError, match="tiles read 32"):
            native.extension().woq_grouped(x, torch.tensor([0, 17]), t.codes, t.scale, 0, 48, 128, t.block, 0, 0, False)
        assert torch.equal(t.grouped(x, torch.tensor([0, 17])), t.grouped(x.clone(), torch.tensor([0, 17])))

    def test_table_product_is_the_exact_products_summed_in_fp32_whatever_the_rows():
        """The self-conditioning product reads the table in place: the bf16 rounding of an fp32 sum of exact bf16
        products (within fp32 rounding of the fp64 sum), each row the same alone as among any rows."""
        table = (torch.randn(768, 192, generator=GEN) * 0.05).to(torch.bfloat16)
        probs = torch.softmax(torch.randn(2, 21, 768, generator=GEN) * 4, -1).to(torch.bfloat16)
        got = native.table_product(probs, table)
        assert got.shape == (2, 21, 192) and got.dtype == torch.bfloat16
        exact = probs.double() @ table.double()
        bound = 1e-5 * (probs.double().abs() @ table.double().abs()) + 2 ** -8 * exact.abs()
        assert torch.all((got.double() - exact).abs() <= bound)
        assert torch.equal(native.table_product(probs[1, 3:4], table), got[1, 3:4])
        assert torch.equal(native.table_product(probs[0, :16], table), got[0, :16])
        leaf = table.clone().requires_grad_()
        assert native.table_product(probs, leaf) is None  # training keeps torch's matmul (it has a backward)
        assert native.table_product(probs, table[:, :100]) is None  # columns not a multiple of 64

    def test_table_product_long_chunks_sum_in_the_same_order():
        """A vocabulary that is a multiple of 1024 takes chunks of 1024 rows (others 256); the sums are the same:
        with 256 zero probabilities appended (chunks of 256, each zero product adding exactly nothing) the product
        is bit for bit the one over the 1024 rows alone."""
        table = (torch.randn(1280, 128, generator=GEN) * 0.05).to(torch.bfloat16)
        probs = torch.softmax(torch.randn(20, 1280, generator=GEN) * 4, -1).to(torch.bfloat16)
        probs[:, 1024:] = 0
        assert torch.equal(native.table_product(probs, table), native.table_product(probs[:, :1024].contiguous(),
                                                                                      table[:1024]))

    @pytest.mark.parametrize("kind", ["int4-g64", "nvfp4", "fp8-block"])
    def test_bf16_outputs_are_the_fp32_outputs_rounded(kind):
        """The kernel's bf16 outputs (no fp32 [rows, N] in memory) are the fp32 ones rounded as torch rounds them,
        bit for bit, on every path (few rows, group-scaled, scaled, a strip for many rows)."""
        q = MAKERS[kind]((2, 48, 128))
        t = native.to_tiles(q)
        counts = torch.tensor([3, 37])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        x = torch.randn(int(counts.sum()), 128, generator=GEN).to(torch.bfloat16)
        for invariant in (False, True):
            with row_invariant() if invariant else contextlib.nullcontext():
                got = t.grouped(x, offsets, bf16=True)
                assert got.dtype == torch.bfloat16
                assert torch.equal(got, t.grouped(x, offsets).to(torch.bfloat16))

    @pytest.mark.parametrize("vocab", [48, 2048])  # 2048: rows of 4 KiB, which the kernel pads (a view)
    def test_head_product_is_the_exact_products_summed_in_fp32_whatever_the_rows(vocab):
        """The tied LM head reads the table in place (a transposing expansion per strip of 32 vocabulary rows): the
        bf16 rounding of an fp32 sum of exact bf16 products, each row the same alone as among any rows."""
        table = (torch.randn(vocab, 96, generator=GEN) * 0.05).to(torch.bfloat16)
        hidden = torch.randn(2, 37, 96, generator=GEN).to(torch.bfloat16)
        got = native.head_product(hidden, table)
        assert got.shape == (2, 37, vocab) and got.dtype == torch.bfloat16
        exact = hidden.double() @ table.double().t()
        bound = 1e-5 * (hidden.double().abs() @ table.double().abs().t()) + 2 ** -8 * exact.abs()
        assert torch.all((got.double() - exact).abs() <= bound)
        # one row, a full tile of rows, two tiles and a part: each the same as among all 74
        assert torch.equal(native.head_product(hidden[1, 5:6], table), got[1, 5:6])
        assert torch.equal(native.head_product(hidden[0, :16], table), got[0, :16])
        assert torch.equal(native.head_product(hidden[0, 3:36], table), got[0, 3:36])
        assert native.head_product(hidden, table.clone().requires_grad_()) is None  # training: torch's matmul
        assert native.head_product(hidden[..., :80], table[:, :80].contiguous()) is None  # inputs not whole tiles

    def test_modules_adopt_the_tiles_and_keep_the_dequantize_path():
        experts = QExperts(_int4((4, 64, 32), 32), _int4((4, 32, 32), 32))
        assert isinstance(experts.gate_up, native.TileTensor) and experts.gate_up.scheme == "int4"
        x = torch.randn(10, 32, generator=GEN).to(torch.bfloat16)
        idx = torch.randint(0, 4, (10, 2), generator=GEN)
        weights = torch.rand(10, 2, generator=GEN)
        fast = experts(x, weights, idx)
        L.MODE["kernel"] = "dequant"
        try:
            exact = experts(x, weights, idx)
        finally:
            L.MODE["kernel"] = "auto"
        torch.testing.assert_close(fast.float(), exact.float(), atol=2e-2, rtol=2e-2)
        lin = QLinear(_int4((48, 64)))
        assert isinstance(lin.qweight, native.TileTensor)
        fp32 = torch.randn(3, 64, generator=GEN)  # fp32 activations keep fp32 through the dequantized matmul
        torch.testing.assert_close(lin(fp32), fp32 @ lin.qweight.dequantize(torch.float32).t())



def test_without_an_engine_weights_stay_as_read(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "fp32_available", lambda: False)
    q = _int4((48, 128))
    assert native.adopt(q) is q
    assert not isinstance(QLinear(q).qweight, native.TileTensor)


def test_the_fp32_engine_runs_wherever_it_can_be_built():
    buildable = (platform.system() == "Linux" and platform.machine() == "x86_64"
                 and all(f in cpu_flags() for f in extension.FP32_FLAGS)
                 and shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
                 and os.environ.get("DGEMMA_NATIVE", "auto") != "0")
    assert native.fp32_available() == buildable


if native.fp32_available():

    def _fp32_reference(q, x, index=None):
        """x @ W.T in fp64 with W the format's exact fp32 weight (NVFP4's global scale included)."""
        return x.double() @ q.dequantize(torch.float32, index).double().t()

    @pytest.mark.parametrize("kind", MAKERS)
    @pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 33])
    def test_fp32_engine_matches_the_exact_weight(kind, rows):
        q = MAKERS[kind]((48, 128))
        t = native.to_tiles(q)
        x = torch.randn(rows, 128, generator=GEN)
        got = t.linear(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 48)
        assert torch.all((got.double() - _fp32_reference(q, x)).abs() <= _bound(q, x).double())

    @pytest.mark.parametrize("kind", ["int4-g64", "nvfp4-divides", "fp8-channel", "fp8-block"])
    def test_fp32_engine_rows_are_the_same_alone_and_among_any(kind):
        """One or two rows (straight from the expansion), a few (one tile at a time) and many (the expanded strip)
        take the same products in the same order: every row alone, or two together, equals itself in a call of any
        size, bit for bit, inside row_invariant() or not."""
        q = MAKERS[kind]((7, 48, 128))
        t = native.to_tiles(q)
        counts = torch.tensor([3, 0, 33, 6, 1, 2, 7])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        x = torch.randn(int(counts.sum()), q.shape[-1], generator=GEN)
        got = t.grouped(x, offsets)
        for e in range(7):
            rows = x[offsets[e]:offsets[e + 1]]
            assert torch.all((got[offsets[e]:offsets[e + 1]].double() - _fp32_reference(q, rows, e)).abs()
                             <= _bound(q, rows, e).double()), e
            for r in range(int(offsets[e]), int(offsets[e + 1])):
                assert torch.equal(got[r:r + 1], t.grouped(x[r:r + 1], torch.tensor([0, 1]), only=e)), (e, r)
            if counts[e] >= 2:  # two rows together
                r = int(offsets[e + 1]) - 2
                assert torch.equal(got[r:r + 2], t.grouped(x[r:r + 2], torch.tensor([0, 2]), only=e)), e
        with row_invariant():
            assert torch.equal(t.grouped(x, offsets), got)

    def test_fp32_engine_refuses_what_does_not_fit():
        t = native.to_tiles(_int4((48, 128)))
        mod = extension.fp32_extension()
        x = torch.randn(4, 128, generator=GEN)
        with pytest.raises(RuntimeError, match="offsets ask for 5 rows, x has 4"):
            mod.woq_grouped_f32(x, torch.tensor([0, 5]), t.codes, t.scale, 0, 48, 128, t.block)
        with pytest.raises(RuntimeError, match="offsets must not decrease"):
            mod.woq_grouped_f32(x, torch.tensor([0, 3, 2]), t.codes, t.scale, 0, 48, 128, t.block)
        with pytest.raises(RuntimeError, match="weight: 3072 bytes"):
            mod.woq_grouped_f32(x, torch.tensor([0, 4]), t.codes, t.scale, 0, 64, 128, t.block)
        with pytest.raises(RuntimeError, match="x: contiguous fp32"):
            mod.woq_grouped_f32(x.double(), torch.tensor([0, 4]), t.codes, t.scale, 0, 48, 128, t.block)

    @pytest.mark.parametrize("kind", ["int4-g32", "nvfp4"])
    def test_fp32_experts_are_the_exact_weights_k_sum(kind):
        """QExperts with fp32 activations: every expert in one fp32-engine call per matrix, the k-sum as
        dgemma.model.Experts does it; against each expert's exact weight in fp64."""
        gate_up, down = MAKERS[kind]((6, 64, 96)), MAKERS[kind]((6, 96, 32))
        experts = QExperts(gate_up, down)
        assert isinstance(experts.gate_up, native.TileTensor)
        x = torch.randn(37, 96, generator=GEN)
        idx = torch.stack([torch.randperm(6, generator=GEN)[:3] for _ in range(37)])
        weights = torch.rand(37, 3, generator=GEN)
        got = experts(x, weights, idx)
        want = torch.zeros(37, 96, dtype=torch.float64)
        for t in range(37):
            for j in range(3):
                e = int(idx[t, j])
                g, u = (x[t:t + 1].double() @ gate_up.dequantize(torch.float32, e).double().t()).chunk(2, dim=-1)
                act = torch.nn.functional.gelu(g, approximate="tanh") * u
                want[t] += weights[t, j].double() * (act @ down.dequantize(torch.float32, e).double().t())[0]
        # fp32 rounding of sums that partly cancel: a tolerance on the scale of the outputs
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))

    def test_fp32_engine_leaves_gradients_to_the_dequantized_matmul():
        """The kernels have no backward: activations that need a gradient (LoRA above a quantized layer) take the
        dequantized matmul, whose gradient reaches them."""
        lin = QLinear(_int4((48, 128)))
        assert isinstance(lin.qweight, native.TileTensor)
        x = torch.randn(3, 128, generator=GEN, requires_grad=True)
        lin(x).sum().backward()
        torch.testing.assert_close(x.grad, lin.qweight.dequantize(torch.float32).sum(0).expand(3, -1))

    @pytest.mark.parametrize("trans", [False, True])
    def test_fp32_table_products_read_the_bf16_table_in_place(trans):
        """The LM head (trans) and the self-conditioning product with fp32 activations and a bf16 table: fp32 sums
        of the exact products within fp32 rounding of the fp64 sum, each row the same alone as among any rows."""
        table = (torch.randn(400, 96, generator=GEN) * 0.05).to(torch.bfloat16)
        x = torch.randn(2, 21, 96 if trans else 400, generator=GEN)
        product = native.head_product if trans else native.table_product
        got = product(x, table)
        w = table.double().t() if trans else table.double()
        assert got.dtype == torch.float32 and got.shape == (2, 21, 400 if trans else 96)
        exact = x.double() @ w
        assert torch.all((got.double() - exact).abs() <= 1e-5 * (x.double().abs() @ w.abs()))
        for rows in (slice(3, 4), slice(7, 9), slice(0, 6), slice(2, 15)):  # 1 and 2 rows: the fused head path
            assert torch.equal(product(x[1, rows], table), got[1, rows])
        assert product(x, table.clone().requires_grad_()) is None  # training: torch's matmul
        odd = table[:392].contiguous() if trans else table[:, :88].contiguous()  # outputs not a multiple of 16
        assert product(x, odd) is None

    def test_fp32_engine_reads_16bit_dense_weights_in_place():
        """A bf16 linear layer kept in 16 bits (a quantized checkpoint's dense layers, computed in fp32): the fp32
        engine's sums of the exact products, each row the same alone; with a gradient, the upcast matmul."""
        w = (torch.randn(48, 128, generator=GEN) * 0.05).to(torch.bfloat16)
        lin = QLinear(L.Dense16Tensor(w, shape=(48, 128)))
        x = torch.randn(9, 128, generator=GEN)
        got = lin(x)
        exact = x.double() @ w.double().t()
        assert torch.all((got.double() - exact).abs() <= 1e-5 * (x.double().abs() @ w.double().abs().t()))
        assert torch.equal(lin(x[4:5]), got[4:5])
        xg = x.clone().requires_grad_()
        lin(xg).sum().backward()
        torch.testing.assert_close(xg.grad, w.float().sum(0).expand(9, -1))

    def test_a_quantized_fp32_model_generates_the_same_batched_and_alone(tmp_path):
        """End to end through the fp32 engine (experts, projections, the head and the self-conditioning product):
        each row of a batch equals the same prompt and seed generated alone."""
        path = random_quantized_checkpoint(tmp_path / "m", "tiny", "nvfp4", seed=2, std=0.3, progress=False,
                                           dtype="bfloat16", canvas_length=16)
        _batched_equals_alone(load_model(path, dtype="float32"))
