"""GGUF files of the llama.cpp `diffusion-gemma` conversion (written with the gguf package's own writer): dgemma
reads config, generation settings and tokenizer from the metadata, keeps the quantized tensors as raw blocks,
computes what the reference computes on the dequantized twin, and refuses malformed files."""

from __future__ import annotations

import dataclasses
import resource
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

import dgemma
from dgemma import CheckpointError
from dgemma.checkpoint.gguf import GGUFTensor, read_header
from dgemma.quant.modules import QExperts, QLinear

import quant_writers as qw
from refmodels import build

# hidden 256 so that K-quants (rows of 256 values) fit; the expert down (rows of 32) falls back to Q5_0 as in
# the real conversion. Every type the issue names occurs at least once.
TYPES = {
    "ffn_gate_up_exps.weight": "Q4_K", "ffn_down_exps.weight": "Q5_0", "attn_q.weight": "Q6_K",
    "attn_k.weight": "Q5_K", "attn_v.weight": "Q8_0", "attn_output.weight": "Q5_1", "ffn_gate.weight": "IQ3_S",
    "ffn_up.weight": "Q4_K", "ffn_down.weight": "IQ4_NL", "self_cond_gate.weight": "Q8_0",
    "token_embd.weight": "Q6_K",
}
GEN = {"eb_max_steps": 5, "eb_t_min": 0.25, "eb_t_max": 0.75, "eb_entropy_bound": 0.3,
       "eb_stability_threshold": 2, "eb_confidence_threshold": 0.01}
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] + \
    [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello",
                                            "▁w", "or", "ld", "orld", "▁world", "▁hello"]


def _tokenizer_meta(vocab: int) -> dict:
    tokens = TOKENS + [f"<unused{i}>" for i in range(vocab - len(TOKENS))]
    types = [3] * 6 + [6] * 256 + [1] * (len(TOKENS) - 262) + [4] * (vocab - len(TOKENS))
    scores = [0.0] * 262 + [-float(i) for i in range(len(TOKENS) - 262)] + [0.0] * (vocab - len(TOKENS))
    return dict(tokens=tokens, types=types, scores=scores, bos_token_id=2, eos_token_id=1, padding_token_id=0,
                unknown_token_id=3, eot_token_id=5,
                chat_template="{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>"
                              "{% endfor %}")


@pytest.fixture(scope="module")
def gg(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    text = {"hidden_size": 256, "vocab_size": 300}
    _, ckpt = build(root, "base", text, canvas_length=8, seed=7)
    path = root / "dir" / "model-Q4_K_M.gguf"
    path.parent.mkdir()
    twin = root / "twin"
    qw.write_gguf(ckpt, path, twin, TYPES, gen=GEN, tokenizer=_tokenizer_meta(300))
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randint(0, 300, (2, 6), generator=g), torch.randint(0, 300, (2, 8), generator=g),
              torch.randn(2, 8, 300, generator=g))
    return dict(root=root, path=path, twin=twin, ckpt=ckpt, inputs=inputs)


def test_logits_match_reference_on_the_dequantized_twin(gg):
    model = dgemma.load_model(gg["path"], dtype=torch.float32)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(gg["twin"], dtype=torch.float32).eval()
    prompt, canvas, sc = gg["inputs"]
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
    torch.testing.assert_close(model.canvas_logits(prompt, canvas, sc), want, atol=1e-4, rtol=0)
    # kept as raw blocks: every quantized matrix is a GGUFTensor of its file's type
    schemes = {m.qweight.scheme for m in model.module.modules() if isinstance(m, QLinear)}
    for layer in model.module.layers:
        assert isinstance(layer.experts, QExperts)
        schemes |= {layer.experts.gate_up.scheme, layer.experts.down.scheme}
    assert schemes == {"gguf-" + t for k, t in TYPES.items() if k != "token_embd.weight"}
    out = model.generate(prompt[:1], max_new_tokens=8, seed=0)
    assert out.ids and all(0 <= i < 300 for i in out.ids)


def test_a_directory_holding_the_file_loads_the_same(gg):
    a = dgemma.load_model(gg["path"], dtype=torch.float32).canvas_logits(*gg["inputs"])
    b = dgemma.load_model(gg["path"].parent, dtype=torch.float32).canvas_logits(*gg["inputs"])
    assert torch.equal(a, b)


def test_config_and_generation_settings_from_metadata(gg):
    model = dgemma.load_model(gg["path"], dtype=torch.float32)
    ref = dgemma.load_model(gg["ckpt"], dtype=torch.float32).config
    ours, theirs = dataclasses.asdict(model.config), dataclasses.asdict(ref)
    vision = {"image_token_id", "boi_token_id", "eoi_token_id", "vision_config", "vision_bidirectional"}
    for field in set(theirs) - {"torch_dtype", "has_vision", "eos_token_id"} - vision:
        assert ours[field] == theirs[field], field
    assert model.vision is None and ours["vision_config"] is None  # a text GGUF (the tower is in an mmproj file)
    assert model.config.layers[1].partial_rotary_factor == 0.25 and model.config.layers[1].head_dim == 32
    gen = model.generation_config
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max, gen.entropy_bound, gen.stability_threshold,
            gen.confidence_threshold) == (5, 0.25, 0.75, 0.3, 2, 0.01)
    assert gen.eos_ids == [1, 5] and gen.pad_token_id == 0


def test_tokenizer_from_metadata(gg):
    tok = dgemma.load_model(gg["path"], dtype=torch.float32).tokenizer
    ids = tok.encode("hello world")
    assert [TOKENS[i] for i in ids] == ["hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    # byte fallback for characters outside the vocabulary, and back
    ids = tok.encode("hé")
    assert [TOKENS[i] for i in ids] == ["h", "<0xC3>", "<0xA9>"] and tok.decode(ids) == "hé"
    # control tokens are atomic; the chat template comes from the metadata
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<bos><start_of_turn>hello<end_of_turn>"
    assert tok.encode(text)[:2] == [2, 4] and tok.encode(text)[-1] == 5


def _q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 by the spec: blocks of 34 bytes = fp16 d + 32 int8; value = d * q."""
    b = raw.reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(*raw.shape[:-1], -1)


def _q4_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K by the spec: 144-byte super-blocks of 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins
    for 8 sub-blocks of 32, 128 bytes of nibbles (each 32-byte chunk: low nibbles = sub-block 2j, high = 2j+1);
    value = d * scale * q - dmin * min."""
    b = raw.reshape(-1, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    s = b[:, 4:16].astype(np.int32)
    sc, mn = np.zeros((len(b), 8), np.float32), np.zeros((len(b), 8), np.float32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    out = d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]
    return out.reshape(*raw.shape[:-1], -1)


def test_blocks_dequantize_exactly(gg):
    model = dgemma.load_model(gg["path"], dtype=torch.float32)
    reader = gguf.GGUFReader(str(gg["path"]))
    tensors = {t.name: t for t in reader.tensors}
    gu = model.module.layers[1].experts.gate_up
    raw = np.array(tensors["blk.1.ffn_gate_up_exps.weight"].data)
    for e in range(4):
        assert np.array_equal(gu.dequantize(torch.float32, index=e).numpy(), _q4_k(raw[e]))
    v = model.module.layers[2].self_attn.v_proj.qweight
    assert np.array_equal(v.dequantize(torch.float32).numpy(), _q8_0(np.array(tensors["blk.2.attn_v.weight"].data)))
    # every other type: what the gguf package's own dequantizer gives for the file's bytes
    for name, mod in (("blk.0.attn_q.weight", model.module.layers[0].self_attn.q_proj),
                      ("blk.0.attn_k.weight", model.module.layers[0].self_attn.k_proj),
                      ("blk.0.attn_output.weight", model.module.layers[0].self_attn.o_proj),
                      ("blk.3.ffn_gate.weight", model.module.layers[3].mlp.gate_proj),
                      ("blk.3.ffn_down.weight", model.module.layers[3].mlp.down_proj)):
        t = tensors[name]
        assert np.array_equal(mod.qweight.dequantize(torch.float32).numpy(),
                              gguf.quants.dequantize(np.array(t.data), t.tensor_type)), name
    down = model.module.layers[0].experts.down
    t = tensors["blk.0.ffn_down_exps.weight"]
    assert np.array_equal(down.dequantize(torch.float32, index=3).numpy(),
                          gguf.quants.dequantize(np.array(t.data)[3], t.tensor_type))
    # the embedding is dequantized once, densely
    t = tensors["token_embd.weight"]
    assert torch.equal(model.module.embed_tokens.weight, torch.from_numpy(gguf.quants.dequantize(np.array(t.data),
                                                                                          t.tensor_type)))
    assert isinstance(gu, GGUFTensor) and gu.nbytes == raw.nbytes and gu.bits_per_weight == 4.5


# ---------------------------------------------------------------------------------------------------------------
# refused
# ---------------------------------------------------------------------------------------------------------------
def _rewrite(gg, tmp_path, drop_key=None, replace=None, drop_tensor=None, arch="diffusion-gemma", shape_of=None,
             extra=None):
    """A copy of the test GGUF with one metadata key / tensor dropped or changed (`extra`: {key: (value, type)})."""
    src = gguf.GGUFReader(str(gg["path"]))
    out = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(out), arch)
    for name, (value, vtype) in (extra or {}).items():
        w.add_key_value(name, value, vtype)
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == drop_key:
            continue
        value = field.contents()
        vtype = field.types[0]
        if replace and name in replace:
            value = replace[name]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    for t in src.tensors:
        if t.name == drop_tensor:
            continue
        data = np.array(t.data)
        if t.name == shape_of:
            data = data[:-1]
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _refused(path, *needles):
    with pytest.raises(CheckpointError) as exc:
        dgemma.load_model(path, dtype=torch.float32)
    for n in needles:
        assert n in str(exc.value), f"{n!r} not in {str(exc.value)!r}"


def test_refuses_another_architecture(gg, tmp_path):
    _refused(_rewrite(gg, tmp_path, arch="gemma3"), "bad.gguf", "gemma3", "diffusion-gemma")


def test_refuses_missing_metadata(gg, tmp_path):
    _refused(_rewrite(gg, tmp_path, drop_key="diffusion.canvas_length"), "bad.gguf", "diffusion.canvas_length")


def test_refuses_missing_expert_tensor(gg, tmp_path):
    _refused(_rewrite(gg, tmp_path, drop_tensor="blk.2.ffn_down_exps.weight"), "bad.gguf",
             "blk.2.ffn_down_exps.weight", "missing")


def test_refuses_missing_weight(gg, tmp_path):
    _refused(_rewrite(gg, tmp_path, drop_tensor="blk.1.post_ffw_norm_2.weight"), "bad.gguf",
             "layers.1.post_feedforward_layernorm_2.weight")


def test_refuses_wrong_shape(gg, tmp_path):
    _refused(_rewrite(gg, tmp_path, shape_of="blk.0.attn_k.weight"), "bad.gguf", "blk.0.attn_k.weight", "shape")


def test_refuses_a_broken_file(gg, tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(gg["path"].read_bytes()[:1000])
    _refused(bad, "trunc.gguf")


def test_refuses_two_gguf_files_in_one_directory(gg, tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    shutil.copy(gg["path"], d / "a.gguf")
    shutil.copy(gg["path"], d / "b.gguf")
    _refused(d, "a.gguf", "b.gguf")


def test_info_reports_gguf_types_and_bits_per_weight(gg):
    from dgemma.info import describe

    info = describe(gg["path"])
    assert info["format"].startswith("GGUF (Q4_K") and "Q5_0" in info["format"]
    # gate_up in Q4_K (4.5 bits), down in Q5_0 (5.5 bits), per-expert scales in F32
    e, i, h = 4, 32, 256
    experts = info["parts"]["experts"]
    assert experts["weights"] == 4 * (e * 3 * i * h + e)
    assert experts["bytes"] == 4 * (e * 2 * i * h * 144 // 256 + e * h * i * 22 // 32 + 4 * e)
    assert describe(gg["path"].parent)["parts"] == info["parts"]


def test_header_parser_agrees_with_the_gguf_package(gg):
    from dgemma.checkpoint.gguf import open_gguf

    ours = open_gguf(gg["path"])
    theirs = gguf.GGUFReader(str(gg["path"]))
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.offset, list(mine.shape), mine.tensor_type, mine.n_bytes) == \
            (t.data_offset, t.shape.tolist(), int(t.tensor_type), t.n_bytes)
    for name, field in theirs.fields.items():
        if not name.startswith("GGUF."):
            value = field.contents()
            assert ours.meta[name] == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "Q5_K", "IQ4_NL"])
def test_block_dequantizers_agree_with_the_gguf_package(qtype):
    """dgemma's torch dequantizers (Q8_0, Q5_0, Q4_K, Q6_K; the others go through gguf.quants) give exactly the
    gguf package's floats, rows and experts alike."""
    from dgemma.checkpoint.gguf import dequantize_blocks

    raw = qw.random_blocks(qtype, (3, 16), 512, seed=11)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    got = dequantize_blocks(torch.from_numpy(raw), int(gguf.GGMLQuantizationType[qtype]))
    assert got.shape == (3, 16, 512) and np.array_equal(got.numpy(), want)
    assert np.array_equal(dequantize_blocks(torch.from_numpy(raw[1]), int(gguf.GGMLQuantizationType[qtype])).numpy(),
                          want[1])


def test_release_depth(tmp_path):
    """30 layers with the default pattern, from a reference-saved checkpoint (per_layer_config "05" ... "29"):
    the converter's per-layer arrays (head_count_kv, sliding_window_pattern) give full layers at 5, 11, ..., 29."""
    _, ckpt = build(tmp_path, "deep", {"num_hidden_layers": 30, "layer_types": None}, canvas_length=8, seed=8)
    path, twin = tmp_path / "deep.gguf", tmp_path / "twin"
    qw.write_gguf(ckpt, path, twin, {"ffn_gate_up_exps.weight": "Q8_0", "attn_q.weight": "Q8_0"}, gen=GEN,
                  tokenizer=_tokenizer_meta(96))
    model = dgemma.load_model(path, dtype=torch.float32)
    assert [i for i, s in enumerate(model.config.layers) if not s.sliding] == [5, 11, 17, 23, 29]
    g = torch.Generator().manual_seed(4)
    prompt, canvas = torch.randint(0, 96, (1, 9), generator=g), torch.randint(0, 96, (1, 8), generator=g)
    with torch.no_grad():
        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(twin, dtype=torch.float32).eval()
        want = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    torch.testing.assert_close(model.canvas_logits(prompt, canvas), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("alignment", [0, 7, 3 << 20])
def test_refuses_a_bad_alignment(gg, tmp_path, alignment):
    path = _rewrite(gg, tmp_path, extra={"general.alignment": (alignment, gguf.GGUFValueType.UINT32)})
    _refused(path, "general.alignment must be a power of two")


@pytest.mark.parametrize("key,value", [("diffusion-gemma.attention.key_length", 0),
                                       ("diffusion-gemma.block_count", 0)])
def test_refuses_a_zero_size(gg, tmp_path, key, value):
    _refused(_rewrite(gg, tmp_path, replace={key: value}), key, "positive integer")


def test_refuses_a_size_of_the_wrong_type(gg, tmp_path):
    key = "diffusion-gemma.block_count"
    path = _rewrite(gg, tmp_path, drop_key=key, extra={key: ("four", gguf.GGUFValueType.STRING)})
    _refused(path, key, "positive integer")


@pytest.mark.parametrize("n_tensors,n_kv,body", [
    (1 << 60, 0, b""),  # a tensor count no file holds
    (0, 1, struct.pack("<Q", 1 << 40) + b"k"),  # a key claiming a terabyte
    (0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 1 << 58)),  # a string array of 2^58 entries
])
def test_corrupt_header_counts_read_nothing_big(tmp_path, n_tensors, n_kv, body):
    """Counts and lengths the file cannot hold are refused before anything is read or allocated for them."""
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body + b"\0" * 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(path, str(path))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no big allocation


def test_an_unknown_tensor_type_names_the_tensor(gg, tmp_path):
    """A tensor entry whose GGML type number no gguf release knows: the error names the tensor."""
    data = bytearray(gg["path"].read_bytes())
    meta, tensors = read_header(gg["path"])
    name = "blk.0.attn_q.weight"
    # the type field follows the name, dim count and dims in the tensor table; find it from the header layout
    needle = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(needle) + len(needle)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == tensors[name].tensor_type
    struct.pack_into("<I", data, type_at, 999)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    _refused(bad, name, "GGML type 999")


def test_an_array_over_the_limit_is_refused_before_it_is_read(tmp_path):
    """2^28 float32 scores fit in a 1 GiB (sparse) file but would be ~18 GB as Python floats: refused unread."""
    from dgemma.checkpoint.gguf import MAX_ARRAY

    path = tmp_path / "big-array.gguf"
    key = b"tokenizer.ggml.scores"
    count = MAX_ARRAY * 16
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key +
                struct.pack("<IIQ", 9, 6, count))
        f.truncate(f.tell() + 4 * count)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(path, "over the limit")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
