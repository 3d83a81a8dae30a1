"""config.json is read exactly as the reference reads it, at every depth and in every layout it accepts.

Each case writes config.json with the reference's own `save_pretrained` (transformers >= 5.15 saves the full layers'
shapes as `per_layer_config` with zero-padded keys: "05", "11", ...), optionally rewrites it into another layout the
reference accepts (plain keys, the flat `global_head_dim` / `num_global_key_value_heads` keys, no `layer_types`,
null or empty `per_layer_config`), then builds the reference model from that file on the meta device (no memory, so
the real 26B-A4B is in the table) and compares, layer by layer, what dgemma makes of the same file: kind, head dim,
KV heads, K-as-V, RoPE frequencies, and every text tensor's name and shape.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

from dgemma.checkpoint.load import expected_tensors
from dgemma.config import ConfigError, ModelConfig
from dgemma.checkpoint.keys import map_key
from dgemma.model import rope_inv_freq

from refmodels import VISION

S, F = "sliding_attention", "full_attention"

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, global_head_dim=16, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
            moe_intermediate_size=16, sliding_window=8)
# The release, and Gemma 4 E-size-shaped stacks (full layers every 5th: per_layer_config keys "04", "09", ...).
REAL = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
            num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
            top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144)
E2B_SHAPED = dict(vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                  num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=768,
                  sliding_window=512, layer_types=[F if (i + 1) % 5 == 0 else S for i in range(35)])
E4B_SHAPED = dict(vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
                  num_global_key_value_heads=2, num_experts=16, top_k_experts=4, moe_intermediate_size=1024,
                  sliding_window=512)

DEPTHS = (1, 2, 3, 5, 6, 7, 10, 11, 12, 13, 24, 29, 30, 31, 35, 42, 48)
# Layouts that drop layer_types need the default 5:1 pattern; the others also get a random pattern.
LAYOUTS = ("saved", "unpadded", "flat", "flat_head_only", "flat_defaults", "no_layer_types", "null", "empty")
DROPS_LAYER_TYPES = {"flat_defaults", "no_layer_types"}


def _pattern(depth: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [*(F if rng.random() < 0.3 else S for _ in range(depth - 1)), F]


def _rewrite(raw: dict, layout: str, text: dict) -> None:
    tc = raw["text_config"]
    plc = tc.get("per_layer_config") or {}
    if layout == "unpadded":
        tc["per_layer_config"] = {str(int(k)): v for k, v in plc.items()}
    elif layout.startswith("flat"):
        del tc["per_layer_config"]
        if layout != "flat_defaults":
            tc["global_head_dim"] = text["global_head_dim"]
        if layout == "flat":
            tc["num_global_key_value_heads"] = text["num_global_key_value_heads"]
    elif layout == "null":
        tc["per_layer_config"] = None
    elif layout == "empty":
        tc["per_layer_config"] = {}
    if layout in DROPS_LAYER_TYPES:
        del tc["layer_types"]


def _write(tmp: Path, text: dict, layout: str = "saved") -> Path:
    """config.json as the reference saves it for `text`, rewritten into `layout`."""
    DiffusionGemmaConfig(text_config=dict(text), vision_config=VISION, canvas_length=16).save_pretrained(tmp)
    path = tmp / "config.json"
    raw = json.loads(path.read_text())
    _rewrite(raw, layout, text)
    path.write_text(json.dumps(raw, indent=2))
    return path


def _compare(path: Path) -> ModelConfig:
    """Build the reference from `path` on the meta device and check dgemma's reading of the same file."""
    ref_cfg = DiffusionGemmaConfig.from_pretrained(path.parent)
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(ref_cfg)
    cfg = ModelConfig.from_file(path)
    tc = ref_cfg.text_config
    layers = ref.model.decoder.layers
    assert len(cfg.layers) == len(layers) == tc.num_hidden_layers
    rotary = DiffusionGemmaTextRotaryEmbedding(tc)  # on the CPU: its frequencies are real numbers
    for i, (spec, layer) in enumerate(zip(cfg.layers, layers)):
        attn = layer.self_attn
        assert spec.kind == tc.layer_types[i], i
        assert spec.sliding == attn.is_sliding, i
        assert spec.head_dim == attn.head_dim, i
        assert spec.num_kv_heads == tc.num_attention_heads // attn.num_key_value_groups, i
        assert spec.has_v_proj == (attn.v_proj is not None), i
        torch.testing.assert_close(rope_inv_freq(spec), getattr(rotary, f"{spec.kind}_inv_freq"), rtol=0, atol=0)
        assert getattr(rotary, f"{spec.kind}_attention_scaling") == 1.0
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_experts",
                "top_k_experts", "moe_intermediate_size", "sliding_window", "max_position_embeddings",
                "rms_norm_eps", "final_logit_softcapping"):
        assert getattr(cfg, key) == getattr(tc, key), key
    assert cfg.canvas_length == ref_cfg.canvas_length

    # Every text tensor: the decoder's (and the encoder's layer scalars) by name and shape, both ways; the tied
    # copies (encoder text weights) must have the shape of what they copy.
    want = expected_tensors(cfg)
    main, tied = {}, {}
    for key, tensor in ref.state_dict().items():
        kind, name = map_key(key)
        assert kind != "unknown", key
        if kind == "main":
            main[key] = tuple(tensor.shape)
        elif kind == "tied":
            tied[name] = tuple(tensor.shape)
    assert main == want
    by_name = {map_key(k)[1]: shape for k, shape in want.items()}
    assert tied and all(by_name[name] == shape for name, shape in tied.items())
    return cfg


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_every_depth_and_layout(tmp_path, depth, layout):
    text = dict(TINY, num_hidden_layers=depth)
    if layout not in DROPS_LAYER_TYPES:
        text["layer_types"] = _pattern(depth, seed=depth)
    _compare(_write(tmp_path, text, layout))


@pytest.mark.parametrize("depth", (6, 12, 30))
def test_default_pattern_saved_with_padded_keys(tmp_path, depth):
    """No layer_types given: the 5:1 pattern; the reference saves its full layers under zero-padded keys."""
    path = _write(tmp_path, dict(TINY, num_hidden_layers=depth))
    keys = list(json.loads(path.read_text())["text_config"]["per_layer_config"])
    assert keys == [f"{i:0{len(str(depth - 1))}d}" for i in range(5, depth, 6)]
    cfg = _compare(path)
    assert [i for i, s in enumerate(cfg.layers) if not s.sliding] == list(range(5, depth, 6))


@pytest.mark.parametrize("name,text", [("26b-a4b", REAL), ("e2b-shaped", E2B_SHAPED), ("e4b-shaped", E4B_SHAPED)])
@pytest.mark.parametrize("layout", ("saved", "unpadded", "flat"))
def test_full_size_shapes(tmp_path, name, text, layout):
    cfg = _compare(_write(tmp_path, text, layout))
    full = [i for i, s in enumerate(cfg.layers) if not s.sliding]
    if name == "26b-a4b":
        assert full == [5, 11, 17, 23, 29]
        assert {(s.head_dim, s.num_kv_heads) for s in cfg.layers if not s.sliding} == {(512, 2)}
        assert expected_tensors(cfg)["model.decoder.layers.5.self_attn.q_proj.weight"] == (8192, 2816)
    if name == "e2b-shaped":
        assert full[:2] == [4, 9]


def test_reference_defaults_fill_absent_keys(tmp_path):
    """Only the MoE keys given: every other shape key takes the reference's default (30 layers, 5:1, ...)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "diffusion_gemma", "vision_config": VISION, "text_config": {
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16}}))
    cfg = _compare(path)
    assert cfg.num_hidden_layers == 30 and cfg.vocab_size == 262144 and cfg.canvas_length == 256


def _config_with(tmp_path: Path, edit) -> Path:
    path = _write(tmp_path, dict(TINY, num_hidden_layers=12))
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


def _plc(value):
    return lambda raw: raw["text_config"].__setitem__("per_layer_config", value)


# (what is changed, the edit, the text the error must hold, whether the reference refuses it too)
REFUSED = [
    ("per-layer sliding_window", _plc({"05": {"head_dim": 16, "sliding_window": 3},
                                       "11": {"head_dim": 16, "sliding_window": 3}}),
     "per_layer_config['05'].sliding_window", True),
    ("per-layer intermediate_size", _plc({"05": {"intermediate_size": 8}, "11": {"intermediate_size": 8}}),
     "per_layer_config['05'].intermediate_size", True),
    ("full layers differ", _plc({"05": {"head_dim": 16}, "11": {"head_dim": 32}}), "full_attention layers 5 and 11",
     True),
    ("one sliding layer differs", _plc({"0": {"head_dim": 16}}), "sliding_attention layers 0 and 1", True),
    ("index out of range", _plc({"12": {"head_dim": 16}}), "per_layer_config['12']", True),
    ("not an index", _plc({"full": {"head_dim": 16}}), "per_layer_config['full']", True),
    ("bad head_dim", _plc({"05": {"head_dim": 0}, "11": {"head_dim": 0}}), "per_layer_config['05'].head_dim", None),
    ("num_experts missing", lambda raw: raw["text_config"].pop("num_experts"), "text_config.num_experts", True),
    ("untied", lambda raw: raw.__setitem__("tie_word_embeddings", False), "tie_word_embeddings", False),
    ("attention bias", lambda raw: raw["text_config"].__setitem__("attention_bias", True), "attention_bias", False),
    ("layer_types length", lambda raw: raw["text_config"]["layer_types"].pop(), "text_config.layer_types", None),
]


@pytest.mark.parametrize("what,edit,message,reference_refuses", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_name_the_key(tmp_path, what, edit, message, reference_refuses):
    path = _config_with(tmp_path, edit)
    with pytest.raises(ConfigError, match=None) as e:
        ModelConfig.from_file(path)
    assert message in str(e.value) and str(path) in str(e.value)
    if reference_refuses is not None:  # dgemma refuses what the reference refuses, and (False) what it cannot run
        try:
            with torch.device("meta"):
                DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_pretrained(tmp_path))
            refused = False
        except Exception:  # noqa: BLE001 - any failure to build counts
            refused = True
        assert refused == reference_refuses


def test_override_equal_to_global_is_dropped(tmp_path):
    """An override that repeats the global value is no override (the reference drops it)."""
    path = _config_with(tmp_path, _plc({"05": {"head_dim": 8, "num_key_value_heads": 2, "sliding_window": 8},
                                        "11": {"head_dim": 8}}))
    cfg = _compare(path)
    assert {s.head_dim for s in cfg.layers} == {8}


def test_proportional_rope_factor(tmp_path):
    def edit(raw):
        raw["text_config"]["rope_parameters"]["full_attention"]["factor"] = 8.0
    cfg = _compare(_config_with(tmp_path, edit))
    assert cfg.layers[5].rope_factor == 8.0


def test_full_size_flops_by_hand(tmp_path):
    """One denoising step of the 26B-A4B (256-token canvas, 8 cached tokens), counted here component by component
    from the release's numbers, against `decoder_flops` on the config.json the reference saved: 2.383 TFLOP."""
    cfg = ModelConfig.from_file(_write(tmp_path, REAL))
    c, h, v, i, moe, cached = 256, 2816, 262144, 2112, 704, 8
    sliding_proj = h * (16 * 256 + 8 * 256 * 2) + 16 * 256 * h  # q, k, v, o
    full_proj = h * (16 * 512 + 2 * 512) + 16 * 512 * h  # q, k (K-as-V), o
    want = {
        "attn_proj": 2 * c * (25 * sliding_proj + 5 * full_proj),
        "attn_scores": 2 * 2 * c * 16 * (cached + c) * (25 * 256 + 5 * 512),
        "dense_mlp": 2 * 30 * 3 * c * h * i,
        "router": 2 * 30 * c * h * 128,
        "experts": 2 * 30 * 3 * c * 8 * moe * h,
        "sc_soft_embed": 2 * c * v * h,
        "sc_mlp": 2 * 3 * c * h * i,
        "lm_head": 2 * c * h * v,
    }
    got = cfg.decoder_flops(cached, c)
    assert {k: got[k] for k in want} == want
    assert got["total"] == sum(want.values())
    assert abs(got["total"] / 2.383e12 - 1) < 0.003
    # prefill of 8 tokens: the same weights per token without head and self-conditioning, causal keys 1..8
    per_token = (want["attn_proj"] + want["dense_mlp"] + want["router"] + want["experts"]) // c
    keys = 2 * 2 * 16 * sum(range(1, 9)) * (25 * 256 + 5 * 512)
    assert cfg.prefill_flops(8) == 8 * per_token + keys
