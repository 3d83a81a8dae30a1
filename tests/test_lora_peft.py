"""dgemma's LoRA adapters load with the `peft` library onto the reference model of a checkpoint WITH a vision tower
(as every real checkpoint has), and the merged reference gives dgemma's fine-tuned logits."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import DiffusionGemmaForBlockDiffusion

import dgemma
from dgemma.lora import apply_lora, load_adapter, lora_modules, save_adapter
from dgemma.train import TrainConfig, finetune
from imagemodels import VOCAB, build_vision_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    _, path = build_vision_checkpoint(root / "base", seed=5)
    return path


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    """`dgemma finetune` with LoRA (a few steps at a large learning rate, so the adapter matters)."""
    root = tmp_path_factory.mktemp("peft_run")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"copy {s}", "response": s}) + "\n"
                            for s in ("abc", "bca", "cab", "aab", "bbc", "cca")), encoding="utf-8")
    out = root / "out"
    finetune(TrainConfig(base=str(base), data=str(data), out=str(out), steps=3, batch_size=3, lr=2e-2, warmup=0,
                         lora_rank=4, lora_alpha=8.0, progress=False, log_every=1))
    return out / "final"


def _reference(path):
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()


def _inputs(seed=0, batch=2, prompt_len=11, canvas=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, prompt_len), generator=g),
            torch.randint(0, VOCAB, (batch, canvas), generator=g))


def _adapted(model) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and not isinstance(m.lora_A, torch.Tensor)}


def test_peft_loads_finetune_adapter_onto_vision_checkpoint(base, tuned):
    adapter = tuned / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ref = _reference(base)
    assert any("vision_tower" in n for n, _ in ref.named_modules())  # the reference model has its tower
    # No module of the vision tower (nor the encoder's copy of the text stack) matches the target pattern.
    assert not [n for n, _ in ref.named_modules()
                if re.fullmatch(cfg["target_modules"], n) and not n.startswith("model.decoder.")]
    peft_model = PeftModel.from_pretrained(ref, adapter)
    keys = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            for k in load_file(str(adapter / "adapter_model.safetensors"))}
    assert _adapted(peft_model.base_model.model) == keys
    merged = peft_model.merge_and_unload().eval()
    prompt, canvas = _inputs()
    with torch.no_grad():
        want = merged(input_ids=prompt, decoder_input_ids=canvas).logits
        plain = _reference(base)(input_ids=prompt, decoder_input_ids=canvas).logits
    got = dgemma.load_model(tuned).canvas_logits(prompt, canvas)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the model


def test_adapter_round_trip_and_part_choice(base, tmp_path):
    m = dgemma.load_model(base)
    names = apply_lora(m.module, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert names and not any(n.startswith("vision") for n in names)
    with torch.no_grad():
        for mod in lora_modules(m.module).values():
            mod.lora_B.normal_(0, 0.05)
    save_adapter(m.module, tmp_path / "a")
    again = dgemma.load_model(base)
    load_adapter(again.module, tmp_path / "a")
    assert set(lora_modules(again.module)) == set(names)
    prompt, canvas = _inputs(1, batch=1)
    torch.testing.assert_close(again.canvas_logits(prompt, canvas), m.canvas_logits(prompt, canvas), rtol=0, atol=0)
    with pytest.raises(ValueError, match="LoRA targets must be one of text, vision, both"):
        apply_lora(dgemma.load_model(base).module, parts="audio")


def test_vision_and_text_adapter_loads_with_peft(base, tmp_path):
    """--lora-targets both: adapters on the vision tower's linears too; PEFT wraps exactly those, and the merged
    reference gives dgemma's merged soft tokens and text logits."""
    from dgemma.images import preprocess_images
    from dgemma.lora import merge_lora
    from PIL import Image
    import numpy as np

    m = dgemma.load_model(base)
    names = apply_lora(m.module, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(1), parts="both")
    assert any(n.startswith("vision.") for n in names) and any(n.startswith("layers.") for n in names)
    with torch.no_grad():
        for mod in lora_modules(m.module).values():
            mod.lora_B.normal_(0, 0.1)
    save_adapter(m.module, tmp_path / "both")
    merge_lora(m.module)
    peft_model = PeftModel.from_pretrained(_reference(base), tmp_path / "both")
    keys = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            for k in load_file(str(tmp_path / "both" / "adapter_model.safetensors"))}
    assert _adapted(peft_model.base_model.model) == keys
    assert any(k.endswith("self_attn.q_proj.linear") and "vision_tower" in k for k in keys)
    ref = peft_model.merge_and_unload().eval()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((30, 50), (64, 20))]
    proc = preprocess_images(imgs, config=m.image_processor)
    pv, pos = proc["pixel_values"], proc["image_position_ids"]
    with torch.no_grad():
        want = ref.model.encoder.get_image_features(pv, pos, return_dict=True).pooler_output
        plain = _reference(base).model.encoder.get_image_features(pv, pos, return_dict=True).pooler_output
        got, _ = m.vision(pv, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3
    prompt, canvas = _inputs(2)
    with torch.no_grad():
        want_logits = ref(input_ids=prompt, decoder_input_ids=canvas).logits
    torch.testing.assert_close(m.canvas_logits(prompt, canvas), want_logits, rtol=0, atol=1e-6)


def test_finetune_lora_targets(base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "copy ab", "response": "ab"}) + "\n", encoding="utf-8")
    cfg = dict(base=str(base), data=str(data), steps=1, batch_size=1, lora_rank=2, progress=False, log_every=1)
    finetune(TrainConfig(out=str(tmp_path / "b"), lora_targets="both", **cfg))
    tensors = load_file(str(tmp_path / "b" / "final" / "adapter" / "adapter_model.safetensors"))
    vision = {k: t for k, t in tensors.items() if "vision_tower" in k}
    assert vision and len(vision) < len(tensors)
    # Text-only data: the tower's adapters get no gradient (B stays zero); the text ones train.
    assert all(not t.any() for k, t in vision.items() if ".lora_B." in k)
    assert any(t.any() for k, t in tensors.items() if ".lora_B." in k and k not in vision)
    with pytest.raises(ValueError, match="vision tower gets no gradient"):
        TrainConfig(out=str(tmp_path / "v"), lora_targets="vision", **cfg).validate()
    with pytest.raises(ValueError, match="LoRA targets must be one of"):
        TrainConfig(out=str(tmp_path / "x"), lora_targets="all", **cfg).validate()
