"""dgemma.load_model: refused layouts (each a CheckpointError naming the file / tensor at fault), accepted layouts
(identical logits), dtype selection, the vision tower, and generation_config.json defaults."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dgemma
import dgemma.hardware
from dgemma import CheckpointError

from refmodels import build, edit_json

DEC_KEY = "model.decoder.layers.2.mlp.up_proj.weight"
GEN = dict(max_new_tokens=24, max_denoising_steps=7, entropy_bound=0.25, t_min=0.3, t_max=0.9,
           stability_threshold=2, confidence_threshold=0.01)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint (with vision weights, as save_pretrained always writes them), its tensors, and the
    logits dgemma produces for a fixed input (the yardstick for the accepted-layout tests)."""
    ref, ckpt = build(tmp_path_factory.mktemp("loader"), "base", {}, canvas_length=8, seed=3, gen=GEN)
    tensors = load_file(str(ckpt / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(0, 96, (2, 9), generator=g), torch.randint(0, 96, (2, 8), generator=g)
    sc = torch.randn(2, 8, 96, generator=g)
    logits = dgemma.load_model(ckpt).canvas_logits(prompt, canvas, sc)
    with torch.no_grad():  # sanity: the yardstick is the reference's answer
        torch.testing.assert_close(logits, ref(input_ids=prompt, decoder_input_ids=canvas,
                                               self_conditioning_logits=sc).logits, atol=1e-5, rtol=0)
    return dict(ref=ref, ckpt=ckpt, tensors=tensors, inputs=(prompt, canvas, sc), logits=logits)


@pytest.fixture
def ckpt(base, tmp_path) -> Path:
    """A fresh copy of the base checkpoint to mutate."""
    dst = tmp_path / "ckpt"
    shutil.copytree(base["ckpt"], dst)
    return dst


def _save(path: Path, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _logits(model, base):
    return model.canvas_logits(*base["inputs"])


def _refused(path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as exc:
        dgemma.load_model(path)
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# refused
# ---------------------------------------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    _refused(tmp_path / "nowhere", "nowhere")


def test_file_instead_of_directory(ckpt):
    _refused(ckpt / "config.json", "config.json")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    _refused(ckpt, "config.json")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    _refused(ckpt, "config.json")


def test_unknown_model_type(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(model_type="llama"))
    _refused(ckpt, "config.json", "llama")


def test_missing_tensor(base, ckpt):
    tensors = dict(base["tensors"])
    del tensors[DEC_KEY]
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, DEC_KEY, "missing")


def test_missing_embedding_without_any_copy(base, ckpt):
    tensors = {k: v for k, v in base["tensors"].items() if k != "model.decoder.embed_tokens.weight"}
    assert "lm_head.weight" not in tensors and "model.encoder.language_model.embed_tokens.weight" not in tensors
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, "model.decoder.embed_tokens.weight")


def test_unexpected_tensor(base, ckpt):
    tensors = dict(base["tensors"])
    tensors["model.decoder.bogus.weight"] = torch.zeros(3)
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, "model.decoder.bogus.weight")


def test_unexpected_layer(base, ckpt):
    """A layer beyond num_hidden_layers is a mismatch between config and weights, not something to ignore."""
    tensors = dict(base["tensors"])
    tensors["model.decoder.layers.4.input_layernorm.weight"] = torch.ones(64)
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, "model.decoder.layers.4.input_layernorm.weight")


def test_misshaped_tensor(base, ckpt):
    key = "model.decoder.layers.1.self_attn.q_proj.weight"
    tensors = dict(base["tensors"])
    tensors[key] = torch.zeros(tensors[key].shape[0] - 1, tensors[key].shape[1])
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, "model.safetensors", key)


def test_misshaped_tied_copy(base, ckpt):
    """A (redundant) lm_head copy of the wrong shape is refused, not silently ignored."""
    tensors = dict(base["tensors"])
    tensors["lm_head.weight"] = torch.zeros(95, 64)
    _save(ckpt / "model.safetensors", tensors)
    _refused(ckpt, "lm_head.weight")


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _refused(ckpt, "model.safetensors")


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    _refused(ckpt, "model.safetensors")


def _shard(base, ckpt: Path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """Split the tensors over two shards + an index; return the weight map."""
    (ckpt / "model.safetensors").unlink()
    keys = sorted(base["tensors"])
    parts = {names[0]: keys[0::2], names[1]: keys[1::2]}
    weight_map = {}
    for fname, ks in parts.items():
        _save(ckpt / fname, {k: base["tensors"][k] for k in ks})
        weight_map.update({k: fname for k in ks})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_index_lists_missing_shard(base, ckpt):
    _shard(base, ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    _refused(ckpt, "model-00002-of-00002.safetensors", "model.safetensors.index.json")


def test_index_without_weight_map(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _refused(ckpt, "model.safetensors.index.json", "weight_map")


def test_index_points_at_wrong_shard(base, ckpt):
    """The index says a tensor is in a shard that does not hold it."""
    weight_map = _shard(base, ckpt)
    key = next(k for k, f in weight_map.items() if f == "model-00001-of-00002.safetensors")
    weight_map[key] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(ckpt, key)


class _Trap:
    """Unpickling this touches a marker file: proof that the loader unpickled something."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pytorch_bin_only_is_refused_never_unpickled(ckpt, tmp_path, monkeypatch):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04junk, not a pickle at all" * 8)

    def forbidden(*a, **k):
        raise AssertionError("the loader tried to unpickle")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, forbidden)
    msg = _refused(ckpt, "safetensors")
    assert ".bin" in msg or "pickle" in msg
    monkeypatch.undo()

    # A booby-trapped pickle: even a lenient unpickler would run it.
    marker = tmp_path / "unpickled"
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(marker), f)
    _refused(ckpt, "safetensors")
    assert not marker.exists()


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty")


def test_invalid_generation_config(ckpt):
    edit_json(ckpt / "generation_config.json", lambda c: c.update(max_denoising_steps=0))
    _refused(ckpt, "generation_config.json", "max_denoising_steps")


# ---------------------------------------------------------------------------------------------------------------
# accepted
# ---------------------------------------------------------------------------------------------------------------
def test_sharded_checkpoint_loads_identically(base, ckpt):
    _shard(base, ckpt)
    assert not (ckpt / "model.safetensors").exists()
    assert torch.equal(_logits(dgemma.load_model(ckpt), base), base["logits"])


def test_encoder_text_keys_and_lm_head_present(base, ckpt):
    """The layout that also stores the encoder's copies of the tied text weights and lm_head.weight."""
    full = {k: v.detach().clone() for k, v in base["ref"].state_dict().items()}
    assert "lm_head.weight" in full and "model.encoder.language_model.embed_tokens.weight" in full
    assert "model.encoder.language_model.layers.3.experts.gate_up_proj" in full
    assert len(full) > len(base["tensors"])
    _save(ckpt / "model.safetensors", full)
    assert torch.equal(_logits(dgemma.load_model(ckpt), base), base["logits"])


def test_embedding_from_lm_head_copy(base, ckpt):
    """With the decoder embedding absent, its tied lm_head copy fills in."""
    tensors = dict(base["tensors"])
    tensors["lm_head.weight"] = tensors.pop("model.decoder.embed_tokens.weight")
    _save(ckpt / "model.safetensors", tensors)
    assert torch.equal(_logits(dgemma.load_model(ckpt), base), base["logits"])


def test_encoder_layer_scalar_is_used(base, ckpt):
    """The encoder's layer scalar is its own weight: changing it changes the logits (via the KV cache)."""
    tensors = dict(base["tensors"])
    tensors["model.encoder.language_model.layers.0.layer_scalar"] = torch.tensor([0.5])
    _save(ckpt / "model.safetensors", tensors)
    assert not torch.allclose(_logits(dgemma.load_model(ckpt), base), base["logits"], atol=1e-3)


def test_without_vision_weights(base, ckpt, caplog):
    vision = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
    tensors = {k: v for k, v in base["tensors"].items() if not k.startswith(vision)}
    assert len(tensors) < len(base["tensors"])
    _save(ckpt / "model.safetensors", tensors)
    with caplog.at_level(logging.WARNING, logger="dgemma"):
        model = dgemma.load_model(ckpt)
    assert torch.equal(_logits(model, base), base["logits"])
    assert not any("image" in r.getMessage() for r in caplog.records)


def test_vision_tower_loaded(base):
    """The checkpoint's vision tower becomes model.vision; vision=False loads the text stack alone."""
    model = dgemma.load_model(base["ckpt"])
    assert model.vision is not None and model.vision.cfg.hidden_size == 16
    assert all(p.dtype == model.dtype for p in model.vision.parameters())
    assert dgemma.load_model(base["ckpt"], vision=False).vision is None
    assert torch.equal(_logits(model, base), base["logits"])


@pytest.mark.parametrize("dtype, want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                         (torch.bfloat16, torch.bfloat16), ("float32", torch.float32)])
def test_dtype_override(base, dtype, want):
    model = dgemma.load_model(base["ckpt"], dtype=dtype)
    assert model.dtype == want
    assert all(p.dtype == want for p in model.module.parameters())
    logits = _logits(model, base)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # A lower-precision copy of the same weights: same ballpark, not bit-identical.
    err = (logits - base["logits"]).abs().mean().item()
    assert err < 0.5
    if want != torch.float32:
        assert err > 0


def test_bad_dtype(base):
    with pytest.raises(ValueError, match="int8"):
        dgemma.load_model(base["ckpt"], dtype="int8")


@pytest.mark.parametrize("native", [True, False])
def test_checkpoint_dtype_is_the_default_where_the_cpu_computes_it_natively(tmp_path, monkeypatch, native):
    _, ckpt = build(tmp_path, "half", dict(num_hidden_layers=2, layer_types=None), canvas_length=4, seed=0,
                    dtype=torch.float16)
    flags = {"avx512f", "avx512_fp16"} if native else {"avx2", "avx512_bf16"}  # bf16 flags do not make fp16 fast
    monkeypatch.setattr(dgemma.hardware, "cpu_flags", lambda: frozenset(flags))
    assert dgemma.load_model(ckpt).dtype == (torch.float16 if native else torch.float32)
    assert dgemma.load_model(ckpt, dtype="float32").dtype == torch.float32
    assert dgemma.load_model(ckpt, dtype="float16").dtype == torch.float16  # an explicit dtype always wins


# ---------------------------------------------------------------------------------------------------------------
# generation defaults from generation_config.json, per-call overrides
# ---------------------------------------------------------------------------------------------------------------
def test_generation_config_becomes_defaults(base):
    gc = dgemma.load_model(base["ckpt"]).generation_config
    for key, value in GEN.items():
        assert getattr(gc, key) == value, key
    assert gc.eos_token_id == [1, 5] and gc.pad_token_id == 0


def test_generation_defaults_are_used(base):
    model = dgemma.load_model(base["ckpt"])
    prompt = base["inputs"][0][:1]
    g = model.generate(prompt, seed=0)
    assert 1 <= len(g.steps) <= 3  # max_new_tokens 24 / canvas 8
    assert all(1 <= s <= GEN["max_denoising_steps"] for s in g.steps)
    assert len(g.ids) <= 24
    # an explicit override wins over the file
    g = model.generate(prompt, seed=0, max_denoising_steps=2, max_new_tokens=8)
    assert len(g.steps) == 1 and g.steps[0] <= 2 and len(g.ids) <= 8


def test_missing_generation_config_uses_reference_defaults(ckpt):
    (ckpt / "generation_config.json").unlink()
    gc = dgemma.load_model(ckpt).generation_config
    # the reference's global defaults (DiffusionGemmaGenerationConfig._get_default_generation_params)
    assert (gc.new_tokens(prompt_len=10), gc.max_denoising_steps, gc.entropy_bound) == (256, 48, 0.1)
    assert (gc.t_min, gc.t_max, gc.stability_threshold, gc.confidence_threshold) == (0.4, 0.8, 1, 0.005)


@pytest.mark.parametrize("override, name", [
    (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(max_denoising_steps=2.5), "max_denoising_steps"),
    (dict(entropy_bound=-1), "entropy_bound"),
    (dict(entropy_bound=0), "entropy_bound"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(t_min=-0.1), "t_min"),
    (dict(t_min=0.9, t_max=0.5), "t_max"),
    (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=0.0), "confidence_threshold"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(foo=1), "foo"),
])
def test_bad_generation_override(base, override, name):
    model = dgemma.load_model(base["ckpt"])
    prompt = base["inputs"][0][:1]
    with pytest.raises(ValueError, match=name):
        model.generate(prompt, seed=0, **override)
    with pytest.raises(ValueError, match=name):
        list(model.stream(prompt, seed=0, **override))
    # the model's defaults are untouched by a rejected override
    assert model.generation_config.max_denoising_steps == GEN["max_denoising_steps"]
