"""Quantized checkpoints in the published layouts (written by tests/quant_writers.py from the spec): dgemma keeps
them packed, computes what the reference computes on the dequantized twin, dequantizes every code exactly, and
refuses malformed layouts with errors naming the file and tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaForBlockDiffusion

import dgemma
from dgemma import CheckpointError
from dgemma.quant import QTensor
from dgemma.quant.modules import QExperts, QLinear

import quant_writers as qw
from refmodels import build

LAYOUTS = {
    "modelopt-nvfp4": lambda s, d, t: qw.write_nvfp4(s, d, t, "modelopt"),
    "modelopt-nvfp4-config": lambda s, d, t: qw.write_nvfp4(s, d, t, "modelopt", config_entry=True),
    "ct-nvfp4": lambda s, d, t: qw.write_nvfp4(s, d, t, "compressed-tensors", linears=True),
    "ct-fp8-channel": qw.write_fp8_channel,
    "fp8-block": qw.write_fp8_block,
    "fp8-block-24x16": lambda s, d, t: qw.write_fp8_block(s, d, t, block=(24, 16)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    _, ckpt = build(root, "base", {}, canvas_length=8, seed=5)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randint(0, 96, (2, 7), generator=g), torch.randint(0, 96, (2, 8), generator=g),
              torch.randn(2, 8, 96, generator=g))
    return dict(root=root, ckpt=ckpt, inputs=inputs)


@pytest.fixture(scope="module")
def written(base):
    """Every layout, written once: name -> (quantized dir, twin dir)."""
    out = {}
    for name, write in LAYOUTS.items():
        d, t = base["root"] / name, base["root"] / (name + "-twin")
        write(base["ckpt"], d, t)
        out[name] = (d, t)
    return out


def _ref_logits(twin: Path, inputs):
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(twin, dtype=torch.float32).eval()
    prompt, canvas, sc = inputs
    with torch.no_grad():
        return ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_reference_on_the_dequantized_twin(layout, base, written):
    qdir, twin = written[layout]
    model = dgemma.load_model(qdir, dtype=torch.float32)
    got = model.canvas_logits(*base["inputs"])
    want = _ref_logits(twin, base["inputs"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the twin differs from the original weights: the test would notice a reader that ignored the scales
    orig = _ref_logits(base["ckpt"], base["inputs"])
    assert (orig - want).abs().max() > 1e-3
    # kept packed: experts (and the quantized linear layers) are QTensors, nothing expanded
    for layer in model.module.layers:
        assert isinstance(layer.experts, QExperts)
        assert layer.experts.gate_up.shape == (4, 64, 64) and layer.experts.down.shape == (4, 64, 32)
        assert layer.experts.gate_up.bits_per_weight < 9
    quantized_linears = [m for m in model.module.modules() if isinstance(m, QLinear)]
    assert bool(quantized_linears) == (layout not in ("modelopt-nvfp4", "modelopt-nvfp4-config"))
    out = model.generate(base["inputs"][0][:1], max_new_tokens=8, seed=0, max_denoising_steps=3)
    assert len(out.ids) >= 1 and all(0 <= i < 96 for i in out.ids)


def test_quant_format_is_reported(written):
    kinds = {name: dgemma.load_model(d, dtype=torch.float32).quant_format for name, (d, _) in written.items()}
    assert kinds["modelopt-nvfp4"].kind == "nvfp4" and kinds["modelopt-nvfp4"].producer == "modelopt"
    assert kinds["ct-nvfp4"].producer == "compressed-tensors"
    assert kinds["ct-fp8-channel"].kind == "fp8-channel"
    assert kinds["fp8-block-24x16"].block == (24, 16)


# ---------------------------------------------------------------------------------------------------------------
# exact dequantization of every code
# ---------------------------------------------------------------------------------------------------------------
def _all_fp8_bits(n: int) -> torch.Tensor:
    """n fp8 bit patterns cycling through every finite one (NaN patterns 0x7F / 0xFF skipped)."""
    finite = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.int32)
    return finite[torch.arange(n) % len(finite)]


@pytest.mark.parametrize("producer", ["modelopt", "compressed-tensors"])
def test_nvfp4_every_code_and_every_fp8_scale(producer, base, tmp_path):
    d, t = tmp_path / "q", tmp_path / "t"
    qw.write_nvfp4(base["ckpt"], d, t, producer)
    tensors = load_file(str(d / "model.safetensors"))
    packed_name = "weight" if producer == "modelopt" else "weight_packed"
    gs_name = "weight_scale_2" if producer == "modelopt" else "weight_global_scale"
    expect = {}
    for e in range(2):  # gate and up of experts 0 and 1: 4 x [32, 4] scales cover all 254 finite fp8 patterns
        for j, proj in enumerate(("gate_proj", "up_proj")):
            prefix = f"model.decoder.layers.1.experts.{e}.{proj}"
            codes = (torch.arange(32 * 64).view(32, 64) + 3 * j + e) % 16
            bits = _all_fp8_bits(4 * 128)[(2 * e + j) * 128:(2 * e + j + 1) * 128].view(32, 4)
            gs = torch.tensor(0.3 + 0.1 * e + 0.05 * j, dtype=torch.float32)
            tensors[f"{prefix}.{packed_name}"] = qw.pack_e2m1(codes)
            tensors[f"{prefix}.weight_scale"] = qw.fp8_from_bits(bits)
            tensors[f"{prefix}.{gs_name}"] = gs.reshape(()) if producer == "modelopt" else gs.reshape(1)
            # the spec, element by element in Python floats (exact), then one rounding to fp32 by the global scale
            vals = torch.tensor([[qw.e2m1_values()[int(codes[r, c])].item() * qw.fp8_value(int(bits[r, c // 16]))
                                  for c in range(64)] for r in range(32)], dtype=torch.float32)
            expect[(e, j)] = vals * gs if producer == "modelopt" else vals / gs
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    experts = dgemma.load_model(d, dtype=torch.float32).module.layers[1].experts
    for e in range(2):
        w = experts.gate_up.dequantize(torch.float32, index=e)
        assert torch.equal(w[:32], expect[(e, 0)]) and torch.equal(w[32:], expect[(e, 1)])
    assert torch.equal(experts.gate_up.dequantize(torch.float32)[1], experts.gate_up.dequantize(index=1))
    # subnormal scales really occur, and every code value appears
    assert any(0 < qw.fp8_value(b) < 2**-6 for b in _all_fp8_bits(512).tolist())


def test_fp8_channel_every_fp8_value(base, tmp_path):
    d, t = tmp_path / "q", tmp_path / "t"
    qw.write_fp8_channel(base["ckpt"], d, t)
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.decoder.layers.0.self_attn.q_proj"
    bits = _all_fp8_bits(64 * 64).view(64, 64)
    scale = (torch.rand(64, 1) + 0.5).to(torch.bfloat16)
    tensors[key + ".weight"], tensors[key + ".weight_scale"] = qw.fp8_from_bits(bits), scale
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    q = dgemma.load_model(d, dtype=torch.float32).module.layers[0].self_attn.q_proj.qweight
    want = torch.tensor([[qw.fp8_value(int(b)) for b in row] for row in bits.tolist()]) * scale.float()
    assert torch.equal(q.dequantize(torch.float32), want)


def test_fp8_per_tensor_scale_and_weight_without_scales(base, tmp_path, copy_of):
    d, t = tmp_path / "q", tmp_path / "t"
    qw.write_fp8_channel(base["ckpt"], d, t)
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.decoder.layers.1.mlp.down_proj"
    tensors[key + ".weight_scale"] = torch.tensor([0.125], dtype=torch.bfloat16)  # strategy "tensor"
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    q = dgemma.load_model(d, dtype=torch.float32).module.layers[1].mlp.down_proj.qweight
    assert torch.equal(q.dequantize(torch.float32), tensors[key + ".weight"].float() * 0.125)
    bad = copy_of("ct-fp8-channel")
    _edit_tensors(bad, lambda t: t.pop(f"{EXP}.gate_proj.weight"))
    _refused(bad, f"{EXP}.gate_proj.weight_scale", "no weight")


def test_fp8_blocks_straddle_the_gate_up_boundary(tmp_path):
    """moe_intermediate 80: 2I = 160 rows, so the first 128-row block holds all of gate and 48 rows of up; hidden
    64 and I = 80 leave partial column blocks."""
    _, ckpt = build(tmp_path, "wide", {"moe_intermediate_size": 80}, canvas_length=8, seed=2)
    d, t = tmp_path / "q", tmp_path / "t"
    qw.write_fp8_block(ckpt, d, t)
    tensors = load_file(str(d / "model.safetensors"))
    model = dgemma.load_model(d, dtype=torch.float32)
    for layer in range(4):
        key = f"model.decoder.layers.{layer}.experts."
        q, s = tensors[key + "gate_up_proj"], tensors[key + "gate_up_proj_scale_inv"]
        assert s.shape == (4, 2, 1)
        gu = model.module.layers[layer].experts.gate_up
        r, c = torch.arange(160)[:, None], torch.arange(64)[None, :]
        for e in range(4):  # W[r, c] = q[r, c] * s[r // 128, c // 128], rows 0-127 of gate AND up in one block
            want = q[e].float() * s[e][r // 128, c // 128]
            assert torch.equal(gu.dequantize(torch.float32, index=e), want)
            assert torch.equal(gu.dequantize(torch.float32, index=e)[79:81], q[e, 79:81].float() * s[e, 0, 0])
        down = model.module.layers[layer].experts.down
        assert torch.equal(down.dequantize(torch.float32), qw.dequant_fp8_block(tensors[key + "down_proj"],
                                                                                 tensors[key + "down_proj_scale_inv"]))
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 96, (1, 5), generator=g), torch.randint(0, 96, (1, 8), generator=g), None)
    torch.testing.assert_close(model.canvas_logits(*inputs[:2]), _ref_logits(t, inputs), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# refused
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def copy_of(written, tmp_path):
    def make(layout: str) -> Path:
        dst = tmp_path / layout
        shutil.copytree(written[layout][0], dst)
        return dst
    return make


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file({k: v.contiguous().clone() for k, v in t.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})


def _refused(d: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as exc:
        dgemma.load_model(d, dtype=torch.float32)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


EXP = "model.decoder.layers.2.experts.3"


def test_refuses_missing_block_scale(copy_of):
    d = copy_of("modelopt-nvfp4")
    _edit_tensors(d, lambda t: t.pop(f"{EXP}.up_proj.weight_scale"))
    _refused(d, "model.safetensors", f"{EXP}.up_proj.weight", "weight_scale")


def test_refuses_missing_global_scale(copy_of):
    d = copy_of("ct-nvfp4")
    _edit_tensors(d, lambda t: t.pop("model.decoder.layers.0.self_attn.q_proj.weight_global_scale"))
    _refused(d, "model.safetensors", "model.decoder.layers.0.self_attn.q_proj.weight_packed", "weight_global_scale")


def test_refuses_the_other_producers_global_scale_name(copy_of):
    d = copy_of("ct-nvfp4")

    def swap(t):
        t[f"{EXP}.gate_proj.weight_scale_2"] = 1 / t.pop(f"{EXP}.gate_proj.weight_global_scale").reshape(())
    _edit_tensors(d, swap)
    _refused(d, f"{EXP}.gate_proj.weight_scale_2", "weight_global_scale")


def test_refuses_wrong_scale_shape(copy_of):
    d = copy_of("modelopt-nvfp4")
    _edit_tensors(d, lambda t: t.update({f"{EXP}.down_proj.weight_scale": t[f"{EXP}.down_proj.weight_scale"][:, :1]}))
    _refused(d, "model.safetensors", f"{EXP}.down_proj.weight_scale", "shape [64, 1]", "[64, 2]")


def test_refuses_wrong_packed_shape(copy_of):
    d = copy_of("modelopt-nvfp4")
    _edit_tensors(d, lambda t: t.update({f"{EXP}.gate_proj.weight": t[f"{EXP}.gate_proj.weight"][:16]}))
    _refused(d, f"{EXP}.gate_proj.weight", "shape [16, 32]", "[32, 32]")


def test_refuses_missing_expert(copy_of):
    d = copy_of("ct-fp8-channel")
    _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{EXP}.down_proj.")])
    _refused(d, "expert 3 down_proj of layer 2 is missing", f"{EXP}.down_proj")


def test_refuses_extra_expert(copy_of):
    d = copy_of("ct-fp8-channel")
    _edit_tensors(d, lambda t: t.update({k.replace("experts.3.", "experts.9."): v.clone() for k, v in list(t.items())
                                         if k.startswith(EXP + ".")}))
    _refused(d, "expert 9 of layer 2 does not exist")


def test_refuses_unknown_quant_algo(copy_of):
    d = copy_of("modelopt-nvfp4")
    cfg = json.loads((d / "hf_quant_config.json").read_text())
    cfg["quantization"]["quant_algo"] = "W4A8_AWQ"
    (d / "hf_quant_config.json").write_text(json.dumps(cfg))
    _refused(d, "hf_quant_config.json", "W4A8_AWQ")


def test_refuses_unknown_quant_method(copy_of):
    d = copy_of("fp8-block")
    qw._edit_config(d, lambda c: c["quantization_config"].update(quant_method="gptq"))
    _refused(d, "config.json", "gptq")


def test_refuses_unknown_compressed_tensors_scheme(copy_of):
    d = copy_of("ct-fp8-channel")
    qw._edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=4))
    _refused(d, "config.json", "group_0", "unsupported")


def test_refuses_fused_fp8_without_block_scales(copy_of):
    d = copy_of("fp8-block")
    _edit_tensors(d, lambda t: t.pop("model.decoder.layers.1.experts.down_proj_scale_inv"))
    _refused(d, "model.decoder.layers.1.experts.down_proj", "down_proj_scale_inv")


def test_refuses_fused_fp8_experts_without_any_scales(copy_of):
    d = copy_of("fp8-block")
    _edit_tensors(d, lambda t: [t.pop(f"model.decoder.layers.3.experts.{p}_scale_inv") for p in ("gate_up_proj",
                                                                                                 "down_proj")])
    _refused(d, "model.decoder.layers.3.experts.gate_up_proj", "gate_up_proj_scale_inv")


def test_refuses_experts_of_a_layer_that_does_not_exist(copy_of):
    d = copy_of("modelopt-nvfp4")
    _edit_tensors(d, lambda t: t.update({k.replace("layers.2.", "layers.7."): v.clone() for k, v in list(t.items())
                                         if k.startswith("model.decoder.layers.2.experts.")}))
    _refused(d, "model.decoder.layers.7.experts", "config has 4 layers")


def test_modelopt_nested_and_mixed_precision_configs(copy_of, written, base):
    want = dgemma.load_model(written["modelopt-nvfp4"][0], dtype=torch.float32).canvas_logits(*base["inputs"])
    d = copy_of("modelopt-nvfp4")
    hf = json.loads((d / "hf_quant_config.json").read_text())
    (d / "hf_quant_config.json").unlink()
    qw._edit_config(d, lambda c: c.update(quantization_config={"quant_method": "modelopt", **hf}))
    assert torch.equal(dgemma.load_model(d, dtype=torch.float32).canvas_logits(*base["inputs"]), want)
    mixed = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {
        f"model.decoder.layers.0.experts.{e}.gate_proj": {"quant_algo": "NVFP4", "group_size": 16} for e in range(4)}}
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": mixed}))
    assert torch.equal(dgemma.load_model(d, dtype=torch.float32).canvas_logits(*base["inputs"]), want)
    mixed["quantized_layers"]["model.decoder.layers.0.self_attn.q_proj"] = {"quant_algo": "FP8"}
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": mixed}))
    _refused(d, "hf_quant_config.json", "MIXED_PRECISION", "FP8")


def test_refuses_wrong_block_scale_shape(copy_of):
    d = copy_of("fp8-block-24x16")
    key = "model.decoder.layers.0.self_attn.o_proj.weight_scale_inv"
    _edit_tensors(d, lambda t: t.update({key: t[key][:1]}))
    _refused(d, key, "shape [1, 4]", "[3, 4]")


def test_refuses_fp8_weight_without_scale(copy_of):
    d = copy_of("ct-fp8-channel")
    _edit_tensors(d, lambda t: t.pop("model.decoder.layers.0.mlp.up_proj.weight_scale"))
    _refused(d, "model.decoder.layers.0.mlp.up_proj.weight", "weight_scale")


def test_refuses_quantized_tensors_without_a_quantization_config(copy_of):
    d = copy_of("modelopt-nvfp4")
    (d / "hf_quant_config.json").unlink()
    _refused(d, "nvfp4", "quantization_config")


def test_refuses_a_layout_the_config_does_not_announce(copy_of):
    d = copy_of("ct-fp8-channel")
    qw._edit_config(d, lambda c: c.update(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}))
    _refused(d, "fp8-channel", "fp8-block")


# ---------------------------------------------------------------------------------------------------------------
# the QTensor interface
# ---------------------------------------------------------------------------------------------------------------
def test_qtensor_interface(written):
    model = dgemma.load_model(written["ct-nvfp4"][0], dtype=torch.float32)
    q = model.module.layers[0].self_attn.q_proj.qweight
    assert isinstance(q, QTensor) and q.scheme == "nvfp4" and q.shape == (64, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q.linear(x), x @ q.dequantize(torch.float32).T)
    assert q.nbytes == 64 * 32 + 64 * 4 + 64 * 4  # packed codes, fp8 block scales, fp32 global scale per row
    assert q.to("cpu").nbytes == q.nbytes
    gu = model.module.layers[0].experts.gate_up
    with pytest.raises(ValueError):
        gu.linear(x)
    assert torch.equal(gu.dequantize(torch.bfloat16, index=2), gu.dequantize(torch.float32, index=2).bfloat16())


def test_info_reports_format_and_bits_per_weight(written):
    from dgemma.info import describe

    nv = describe(written["modelopt-nvfp4"][0])
    assert nv["format"] == "NVFP4 (modelopt)"
    # e2m1 codes (4 bits) + one fp8 scale per 16 (0.5 bit) + fp32 global and input scales per expert matrix
    experts = nv["parts"]["experts"]
    assert experts["weights"] == 4 * 4 * 3 * 32 * 64
    assert experts["bits_per_weight"] == round(8 * (experts["weights"] * (0.5 + 1 / 16) + 4 * 4 * 3 * 8)
                                               / experts["weights"], 3)
    assert nv["parts"]["attention"]["bits_per_weight"] == 32.0
    fp8 = describe(written["ct-fp8-channel"][0])
    assert fp8["format"] == "FP8 per-channel (compressed-tensors)"
    # a bf16 scale per row: gate/up rows have 64 inputs, down rows 32
    assert fp8["parts"]["experts"]["bits_per_weight"] == round((2 * 32 * 64 * (8 + 16 / 64) + 64 * 32 * (8 + 16 / 32))
                                                               / (3 * 32 * 64), 3)
    blk = describe(written["fp8-block-24x16"][0])
    assert blk["format"] == "FP8 blocks 24x16 (fp8)"
    assert blk["stored_bytes"] == sum(p["bytes"] for p in blk["parts"].values())
    assert describe(written["ct-nvfp4"][0])["parts"]["dense MLP"]["bits_per_weight"] < 5


def test_qexperts_rows_do_not_depend_on_their_neighbours(written):
    """Inside row_invariant() a token's expert output is the same alone or in a batch (small row counts padded)."""
    from dgemma.numerics import row_invariant

    model = dgemma.load_model(written["ct-nvfp4"][0], dtype=torch.float32)
    layer = model.module.layers[0]
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    weights, idx = layer.router(x)
    with row_invariant():
        together = layer.experts(x, weights, idx)
        alone = torch.cat([layer.experts(x[i:i + 1], weights[i:i + 1], idx[i:i + 1]) for i in range(40)])
        assert torch.equal(together, alone)
        assert torch.equal(layer.self_attn.q_proj(x)[:3], layer.self_attn.q_proj(x[:3]))
    # and it is the dense computation with the dequantized experts
    from dgemma.model import Experts

    with torch.device("meta"):
        dense = Experts(model.config)
    dense.gate_up_proj = torch.nn.Parameter(layer.experts.gate_up.dequantize(torch.float32))
    dense.down_proj = torch.nn.Parameter(layer.experts.down.dequantize(torch.float32))
    torch.testing.assert_close(layer.experts(x, weights, idx), dense(x, weights, idx), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The release's depth: 30 layers, the default pattern (full attention at 5, 11, 17, 23, 29), saved by the
    reference with per_layer_config keys "05" ... "29"; tiny widths."""
    root = tmp_path_factory.mktemp("quant-deep")
    _, ckpt = build(root, "deep", {"num_hidden_layers": 30, "layer_types": None}, canvas_length=8, seed=6)
    keys = json.loads((ckpt / "config.json").read_text())["text_config"]["per_layer_config"]
    assert list(keys) == ["05", "11", "17", "23", "29"]
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randint(0, 96, (1, 9), generator=g), torch.randint(0, 96, (1, 8), generator=g),
              torch.randn(1, 8, 96, generator=g))
    return dict(root=root, ckpt=ckpt, inputs=inputs)


@pytest.mark.parametrize("layout", ["modelopt-nvfp4", "ct-nvfp4", "ct-fp8-channel", "fp8-block"])
def test_release_depth_loads_and_matches(layout, deep):
    """The issue's failure: a reference-saved 30-layer checkpoint in the ModelOpt NVFP4 layout was refused (layer 5
    read as sliding). Every layout at that depth loads with full layers where the reference has them and computes
    what the reference computes on the dequantized twin."""
    qdir, twin = deep["root"] / layout, deep["root"] / (layout + "-twin")
    LAYOUTS[layout](deep["ckpt"], qdir, twin)
    model = dgemma.load_model(qdir, dtype=torch.float32)
    assert [i for i, s in enumerate(model.config.layers) if not s.sliding] == [5, 11, 17, 23, 29]
    got = model.canvas_logits(*deep["inputs"]).double()
    # 30 layers of fp32 rounding add up (a reader applies scales in its own order): measure against the reference
    # in float64, and allow dgemma no more than twice the reference's own fp32 error.
    prompt, canvas, sc = deep["inputs"]
    with torch.no_grad():
        ref64 = DiffusionGemmaForBlockDiffusion.from_pretrained(twin, dtype=torch.float64,
                                                              experts_implementation="eager").eval()
        want = ref64(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc.double()).logits
    ref_error = (_ref_logits(twin, deep["inputs"]).double() - want).abs().max().item()
    assert (got - want).abs().max().item() <= max(1e-4, 2 * ref_error)
