"""Vision tower + pooler + projector against the reference DiffusionGemma (random tiny vision configs, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dgemma.images import ImageProcessorConfig, preprocess_images
from dgemma.vision import VisionConfig, VisionEncoder, axial_rope
from refmodels import VISION, text_config

TOWERS = {
    # The shared tiny tower, with a position table wide enough for patch-4 images.
    "tiny": dict(VISION, position_embedding_size=256),
    # Grouped-query heads, two layers, standardisation.
    "gqa_std": dict(VISION, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=12, position_embedding_size=256, standardize=True),
    # Clipped linears with finite ranges that actually clip.
    "clipped": dict(VISION, hidden_size=24, intermediate_size=40, num_attention_heads=3, num_key_value_heads=3,
                    head_dim=8, position_embedding_size=256, use_clipped_linears=True,
                    rope_parameters={"rope_theta": 37.0, "rope_type": "axial"}),
}


def _build(tmp_path, tower: str, seed: int = 0):
    cfg = DiffusionGemmaConfig(text_config=text_config(), vision_config=TOWERS[tower], canvas_length=8)
    torch.manual_seed(seed)
    m = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "vision" not in n:
                continue
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
        for n, b in m.named_buffers():
            if "std_bias" in n:
                b.copy_(0.5 * torch.randn_like(b))
            elif "std_scale" in n:
                b.copy_(0.5 + torch.rand_like(b))
            elif n.endswith("input_min") or n.endswith("output_min"):
                b.fill_(-0.6)
            elif n.endswith("input_max") or n.endswith("output_max"):
                b.fill_(0.7)
    out = tmp_path / tower
    m.save_pretrained(out)
    return m, out


def _images():
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (37, 120), (200, 9), (30, 30)]  # odd sizes, extreme aspect ratio, a small upscaled one
    imgs = []
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        imgs.append(Image.fromarray(arr))
    return imgs


def _ours(out_dir):
    import json
    raw = json.loads((out_dir / "config.json").read_text())
    cfg = VisionConfig.from_dict(raw["vision_config"])
    enc = VisionEncoder(cfg, raw["text_config"]["hidden_size"]).eval()
    enc.load_checkpoint_tensors(load_file(str(out_dir / "model.safetensors")))
    return enc


@pytest.mark.parametrize("tower", list(TOWERS))
def test_soft_tokens_match_reference(tmp_path, tower):
    ref, out_dir = _build(tmp_path, tower)
    enc = _ours(out_dir)
    vc = TOWERS[tower]
    proc = preprocess_images(_images(), config=ImageProcessorConfig(max_soft_tokens=70, patch_size=vc["patch_size"]))
    pv, pos = proc["pixel_values"], proc["image_position_ids"]
    with torch.no_grad():
        want = ref.model.encoder.get_image_features(pv, pos, return_dict=True).pooler_output
        got, counts = enc(pv, pos)
    assert counts == proc["num_soft_tokens"]
    assert got.shape == want.shape == (sum(counts), 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Each image alone gives its own slice of the batched result (padding keys never leak across images or rows).
    start = 0
    with torch.no_grad():
        for i, n in enumerate(counts):
            alone, c = enc(pv[i:i + 1], pos[i:i + 1])
            assert c == [n]
            torch.testing.assert_close(alone, got[start:start + n], rtol=0, atol=1e-5)
            start += n


def test_padding_content_is_ignored(tmp_path):
    _, out_dir = _build(tmp_path, "tiny", seed=1)
    enc = _ours(out_dir)
    proc = preprocess_images(_images()[:2], config=ImageProcessorConfig(max_soft_tokens=70, patch_size=4))
    pv = proc["pixel_values"].clone()
    pad = (proc["image_position_ids"] == -1).all(-1)
    assert pad.any()
    pv[pad] = torch.rand_like(pv[pad])
    with torch.no_grad():
        a, _ = enc(proc["pixel_values"], proc["image_position_ids"])
        b, _ = enc(pv, proc["image_position_ids"])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_axial_rope_layout():
    # First half of the head follows x, second half y: a y-only change leaves the first half unchanged.
    pos = torch.tensor([[[3, 0], [3, 5]]])
    cos, sin = axial_rope(pos, 16, 100.0)
    assert torch.equal(cos[0, 0, :8], cos[0, 1, :8]) and not torch.equal(cos[0, 0, 8:], cos[0, 1, 8:])
    assert torch.equal(cos[0, 0, 8:], torch.ones(8)) and torch.equal(sin[0, 0, 8:], torch.zeros(8))


def test_load_errors(tmp_path):
    _, out_dir = _build(tmp_path, "gqa_std")
    tensors = load_file(str(out_dir / "model.safetensors"))
    enc = VisionEncoder(VisionConfig.from_dict(TOWERS["gqa_std"]), 64)
    key = "model.encoder.vision_tower.encoder.layers.1.self_attn.k_norm.weight"
    before = enc.state_dict()["vision_tower.patch_embedder.input_proj.weight"].clone()
    bad = dict(tensors)
    del bad[key]
    with pytest.raises(ValueError, match="missing.*layers.1.self_attn.k_norm.weight"):
        enc.load_checkpoint_tensors(bad)
    bad = dict(tensors, **{key: torch.ones(5)})
    with pytest.raises(ValueError, match=r"k_norm.weight: shape \[5\], expected \[12\]"):
        enc.load_checkpoint_tensors(bad)
    bad = dict(tensors, **{"model.encoder.vision_tower.encoder.layers.2.mlp.up_proj.linear.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="unexpected.*layers.2"):
        enc.load_checkpoint_tensors(bad)
    # Nothing was copied by the failed loads.
    assert torch.equal(enc.state_dict()["vision_tower.patch_embedder.input_proj.weight"], before)
    # A tower without standardisation has no std_* tensors: the standardised checkpoint's are unexpected.
    plain = VisionEncoder(VisionConfig.from_dict(dict(TOWERS["gqa_std"], standardize=False)), 64)
    with pytest.raises(ValueError, match="unexpected.*std_"):
        plain.load_checkpoint_tensors(tensors)


def test_bad_inputs_and_config():
    enc = VisionEncoder(VisionConfig.from_dict(TOWERS["tiny"]), 64)
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.zeros(1, 18, 47), torch.zeros(1, 18, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="image_position_ids"):
        enc(torch.zeros(1, 18, 48), torch.zeros(1, 17, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="position table"):
        enc(torch.zeros(1, 18, 48), torch.full((1, 18, 2), 300, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 9"):
        enc(torch.zeros(1, 10, 48), torch.zeros(1, 10, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_type"):
        VisionConfig.from_dict(dict(VISION, rope_parameters={"rope_type": "default", "rope_theta": 1.0}))
    with pytest.raises(ValueError, match="head_dim"):
        VisionConfig.from_dict(dict(VISION, head_dim=6))


@pytest.mark.parametrize("seed", [3, 6, 50])
def test_image_runs_match_reference(seed):
    from dgemma.vision import image_block_ids
    from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask
    IMG, BOI, EOI = 90, 91, 92
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(3):
        ids = torch.randint(10, 80, (40,), generator=g)
        if r < 2:  # row 2 has no image
            for start, n in ((3, 5), (15, 9 + r), (30, 1)):
                ids[start - 1], ids[start:start + n], ids[start + n] = BOI, IMG, EOI
        rows.append(ids)
    ids = torch.stack(rows)
    blocks = image_block_ids(ids, IMG)
    assert torch.equal(blocks, get_block_sequence_ids_for_mask((ids == IMG).long(), torch.device("cpu")))
    # The masks built from these runs are checked end to end: image prompts longer than the sliding window give
    # the reference's logits (tests/test_image_generate.py).
