"""int8 / int4 QTensors and their CPU kernels: layouts, exact dequantization, every compute path against the
dequantized weight, row invariance, 16-bit storage with fp32 compute."""

from __future__ import annotations

import pytest
import torch

import dgemma.quant.lowbit as L
from dgemma.config import GenerationConfig
from dgemma.numerics import linear as dense_linear
from dgemma.pipeline import Pipeline
from dgemma.numerics import row_invariant
from dgemma.quant import kernels as K


@pytest.fixture
def exact_mode():
    L.MODE["kernel"] = "dequant"
    yield
    L.MODE["kernel"] = "auto"


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_int4_nibble_order():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = K.pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F]]  # element 2k in the low nibble
    assert torch.equal(K.unpack_int4(packed), codes)
    every = torch.arange(256, dtype=torch.uint8).view(1, 256)
    assert torch.equal(K.pack_int4(K.unpack_int4(every)), every)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_quantize_error_bound(group):
    w = _w(48, 256)
    packed, scale = L.quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert scale.dtype == torch.bfloat16 and scale.shape == (48, 256 // group)
    t = L.Int4Tensor(packed, scale, group, False, shape=(48, 256))
    err = (t.dequantize() - w).abs().view(48, -1, group)
    s = scale.float().unsqueeze(-1)
    # half a step, plus the bf16 rounding of the scale at the group's extreme (|code| <= 8)
    assert (err <= 0.5 * s + 8 * s * 2.0**-8 + 1e-9).all()
    codes = K.unpack_int4(packed).view(48, -1, group).int() - 8
    assert codes.min() >= -8 and codes.max() <= 7


def test_int8_quantize_error_bound():
    w = _w(40, 96)
    q, s = L.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (40,) and q.abs().max() <= 127
    t = L.Int8Tensor(q, s, shape=(40, 96))
    assert ((t.dequantize() - w).abs() <= 0.5 * s.unsqueeze(-1) + 1e-9).all()
    assert torch.equal(q.abs().amax(dim=-1), torch.full((40,), 127, dtype=torch.int8))  # each row uses its range


def test_zero_rows_quantize_to_zero():
    w = torch.zeros(16, 64)
    assert L.Int8Tensor(*L.quantize_int8(w), shape=(16, 64)).dequantize().abs().max() == 0
    assert L.Int4Tensor(*L.quantize_int4(w, 32), 32, False, shape=(16, 64)).dequantize().abs().max() == 0


@pytest.mark.parametrize("n, k", [(64, 32), (128, 256), (192, 704)])
def test_fast_repack_matches_torchs_int4pack(n, k):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(K.unpack_int4(packed).to(torch.int32), 1)
    assert torch.equal(K.repack_int4_blocks(packed), want)


@pytest.mark.parametrize("shape", [(32, 128), (3, 48, 64), (2816 // 44, 704), (2, 128, 64)])
def test_int4_kernel_layout_round_trip(shape):
    packed, scale = L.quantize_int4(_w(*shape), 32)
    t = L.Int4Tensor.from_nibbles(packed, scale, 32, shape, pack=True)
    assert t.kernel_layout == K.int4_pack_supported(shape[-2], shape[-1], 32)
    assert torch.equal(t.nibbles(), packed)
    assert torch.equal(t.scales(), scale)
    plain = L.Int4Tensor(packed, scale, 32, False, shape=shape)
    assert torch.equal(t.dequantize(), plain.dequantize())
    if len(shape) == 3:
        assert torch.equal(t.dequantize(index=1), plain.dequantize()[1])


@pytest.mark.parametrize("rows", [1, 5, 16, 100])
def test_linear_paths_match_the_dequantized_weight(rows):
    w = _w(64, 128, seed=1)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2))
    for t in (L.Int8Tensor(*L.quantize_int8(w), shape=(64, 128)),
              L.Int4Tensor.from_nibbles(*L.quantize_int4(w, 32), 32, (64, 128), pack=True),
              L.Int4Tensor(*L.quantize_int4(w, 32), 32, False, shape=(64, 128))):
        want = x @ t.dequantize().t()
        got = t.linear(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # fused kernels take bf16 activations: relative error ~2^-8 of the row's scale
        tol = 2e-2 * want.abs().max().item()
        assert (got - want).abs().max().item() <= tol, type(t).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, group", [((128, 256), 32), ((192, 704), 64), ((3, 64, 128), 128)])
def test_int4_expansion_from_the_kernel_order_is_exact(shape, group, dtype):
    """The many-rows path expands W.T straight from torch's int4pack order: exactly the dequantized weight, and
    its matmul equals the model's matmul on that weight."""
    w = _w(*shape, seed=3)
    t = L.Int4Tensor.from_nibbles(*L.quantize_int4(w, group), group, shape, pack=True)
    assert t.kernel_layout
    for e in range(shape[0]) if len(shape) == 3 else [None]:
        packed, sz = (t.packed, t.scale) if e is None else (t.packed[e], t.scale[e])
        wt = K.dequant_int4_blocks_t(packed, sz, group, dtype)
        assert wt.shape == shape[-2:][::-1]
        assert torch.equal(wt.t(), t.dequantize(dtype, e))
    x = torch.randn(L.PACK_ROWS + 3, shape[-1], generator=torch.Generator().manual_seed(4)).to(dtype)
    got = t.linear(x, index=0 if len(shape) == 3 else None)
    want = dense_linear(x, t.dequantize(dtype, 0 if len(shape) == 3 else None))
    tol = (1e-5 if dtype == torch.float32 else 1e-2) * want.abs().max().item()
    assert got.dtype == dtype and (got.float() - want.float()).abs().max().item() <= tol


def test_exact_mode_is_the_models_matmul(exact_mode):
    w = _w(2, 64, 96, seed=3)
    x = torch.randn(7, 96)
    for t in (L.Int8Tensor(*L.quantize_int8(w), shape=(2, 64, 96)),
              L.Int4Tensor.from_nibbles(*L.quantize_int4(w, 32), 32, (2, 64, 96), pack=True)):
        assert torch.equal(t.linear(x, index=1), dense_linear(x, t.dequantize(index=1)))
        with pytest.raises(ValueError, match="index"):
            t.linear(x)


def test_fused_index_selects_the_expert():
    w = _w(3, 32, 64, seed=4)
    x = torch.randn(4, 64)
    for t in (L.Int8Tensor(*L.quantize_int8(w), shape=(3, 32, 64)),
              L.Int4Tensor.from_nibbles(*L.quantize_int4(w, 32), 32, (3, 32, 64), pack=True)):
        outs = [t.linear(x, index=e) for e in range(3)]
        for e in range(3):
            want = x @ t.dequantize(index=e).t()
            assert (outs[e] - want).abs().max() <= 2e-2 * want.abs().max()
        assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_row_invariant_inside_row_invariant(kind):
    w = _w(48, 64, seed=5)
    t = L.Int8Tensor(*L.quantize_int8(w), shape=(48, 64)) if kind == "int8" else \
        L.Int4Tensor.from_nibbles(*L.quantize_int4(w, 32), 32, (48, 64), pack=True)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6))
    with row_invariant():
        alone = t.linear(x[3:4])
        batch = t.linear(x)
    assert torch.equal(alone[0], batch[3])


def test_dense16_computes_in_fp32_from_16bit_storage():
    w = _w(32, 64).bfloat16()
    t = L.Dense16Tensor(w, shape=(32, 64))
    x = torch.randn(5, 64)
    assert torch.equal(t.linear(x), dense_linear(x, w.float()))
    assert t.nbytes == 32 * 64 * 2 and t.bits_per_weight == 16
    xb = x.bfloat16()
    assert t.linear(xb).dtype == torch.bfloat16


def test_keep_16bit_storage_wraps_linears():
    from dgemma.model import DiffusionGemma
    from dgemma.presets import config_dict
    from dgemma.config import ModelConfig
    from dgemma.quant.modules import QLinear

    cfg = ModelConfig.from_dict(config_dict("tiny"))
    torch.manual_seed(0)
    model = DiffusionGemma(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    model = model.to(torch.bfloat16)
    n = keep = L.keep_16bit_storage(model, torch.float32)
    assert n == keep > 0
    assert isinstance(model.layers[0].self_attn.q_proj, QLinear)
    assert model.dtype == torch.float32
    # the token table stays 16-bit (it is the largest dense tensor); everything else computes from fp32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n != "embed_tokens.weight")
    assert model.layers[0].self_attn.q_proj.qweight.weight.dtype == torch.bfloat16


def test_16bit_token_table_computes_like_its_fp32_copy(monkeypatch):
    """Embedding lookup, tied head and soft embedding from a bf16 table upcast per chunk of rows equal the same
    computations on the table converted to fp32 as a whole."""
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma, Embedding
    from dgemma.presets import config_dict

    cfg = ModelConfig.from_dict(config_dict("tiny"))
    torch.manual_seed(0)
    model = DiffusionGemma(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    model = model.to(torch.bfloat16).eval()
    full = DiffusionGemma(cfg).to(torch.float32).eval()
    full.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    L.keep_16bit_storage(model, torch.float32)
    L.keep_16bit_storage(full, torch.float32)  # no 16-bit weights left: a plain fp32 model
    assert full.embed_tokens.weight.dtype == torch.float32
    v = cfg.vocab_size
    monkeypatch.setattr(Embedding, "CHUNK", v // 3 + 1)  # several chunks, the last one short
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (2, 7), generator=g)
    assert torch.equal(model.embed(ids), full.embed(ids))
    hidden = torch.randn(2, 7, cfg.hidden_size, generator=g)
    assert torch.allclose(model.lm_head_raw(hidden), full.lm_head_raw(hidden), rtol=0, atol=1e-6)
    probs = torch.softmax(torch.randn(2, 7, v, generator=g), -1)
    assert torch.allclose(model.embed_tokens.soft(probs), full.embed_tokens.soft(probs), rtol=0, atol=1e-6)
    prompt = torch.randint(3, v, (1, 5), generator=g)
    canvas = torch.randint(3, v, (1, cfg.canvas_length), generator=g)
    sc = torch.randn(1, cfg.canvas_length, v, generator=g)
    got = Pipeline(model, GenerationConfig()).canvas_logits(prompt, canvas, sc)
    assert got.dtype == torch.float32
    assert torch.allclose(got, Pipeline(full, GenerationConfig()).canvas_logits(prompt, canvas, sc), rtol=0, atol=1e-4)


def test_nvfp4_pair_table_is_exact_for_every_byte_and_scale():
    from dgemma.checkpoint.formats import _BYTES, FP8, pair_table

    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    want = (scales[:, None, None] * _BYTES[None]).reshape(-1)  # [scale code, byte, 2] flattened
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = pair_table(dtype, torch.device("cpu")).view(dtype).float()
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert torch.equal(got[ok], want[ok]), dtype  # e2m1 x e4m3 is exact in every compute dtype


@pytest.mark.parametrize("divides", [False, True])
def test_nvfp4_fast_linear_matches_the_formula(divides):
    from dgemma.checkpoint.formats import FP8, NVFP4Tensor

    g = torch.Generator().manual_seed(7)
    e, n, k = 3, 48, 64
    packed = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    codes = torch.randint(0, 0x7F, (e, n, k // 16), generator=g, dtype=torch.int32)  # subnormals to 448, no NaN
    scale = codes.to(torch.uint8).view(FP8)
    gs = torch.rand(e, n, generator=g) * 1e-2 + 1e-3
    t = NVFP4Tensor(packed, scale, gs, divides, shape=(e, n, k))
    x = torch.randn(L.PACK_ROWS + 5, k, generator=g)
    for i in range(e):
        ref = t.dequantize(torch.float32, i)
        unscaled = t.expand_unscaled(torch.float32, i)
        assert torch.equal(unscaled / gs[i, :, None] if divides else unscaled * gs[i, :, None], ref)
        assert torch.equal(t.expand_unscaled(torch.bfloat16, i).float(), unscaled)
        for xs in (x, x[:5]):
            want = dense_linear(xs, ref)
            got = t.linear(xs, index=i)
            assert got.dtype == torch.float32
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        got16, want = t.linear(x.bfloat16(), index=i), dense_linear(x, ref)
        assert got16.dtype == torch.bfloat16
        assert (got16.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_scratch_buffers_work_inside_and_outside_inference_mode():
    w = _w(64, 128, seed=9)
    t = L.Int4Tensor.from_nibbles(*L.quantize_int4(w, 32), 32, (64, 128), pack=True)
    x = torch.randn(L.PACK_ROWS, 128, generator=torch.Generator().manual_seed(10))
    K.SCRATCH.buffers.clear()
    with torch.inference_mode():
        inside = t.linear(x)  # fills the scratch buffer with an inference tensor
    assert torch.equal(t.linear(x), inside)
