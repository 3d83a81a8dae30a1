"""Image prompts end to end against the reference: the loaded vision tower, soft tokens placed in the prefill, image
runs attending to themselves (use_bidirectional_attention "vision") or causally, chunked prefill, several canvases,
token-identical `rng="reference"` generation, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dgemma
from dgemma.checkpoint.load import CheckpointError
from imagemodels import BOI, EOI, IMAGE, PROCESSOR, build_vision_checkpoint
from refmodels import ref_generate


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


IMAGES = [_image(40, 28, 0), _image(13, 50, 1)]  # odd sizes, a tall one


def _prompt(counts: list[int], text: list[list[int]]) -> torch.Tensor:
    """text[0] + (boi, image x n, eoi, text[i + 1]) per image."""
    ids = list(text[0])
    for i, n in enumerate(counts):
        ids += [BOI] + [IMAGE] * n + [EOI] + list(text[i + 1])
    return torch.tensor([ids])


def _inputs(n_images: int):
    proc = dgemma.preprocess_images(IMAGES[:n_images], max_soft_tokens=PROCESSOR["max_soft_tokens"],
                                    config=dgemma.images.ImageProcessorConfig(**PROCESSOR))
    text = [[2, 40, 41, 42, 43, 44, 45, 46, 47], [50, 51, 52], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69]]
    ids = _prompt(proc["num_soft_tokens"], text[:n_images + 1])
    return ids, proc["pixel_values"], proc["image_position_ids"]


@pytest.fixture(scope="module", params=["vision", None], ids=["bidirectional", "causal"])
def models(request, tmp_path_factory):
    ref, path = build_vision_checkpoint(tmp_path_factory.mktemp("img"),
                                        text={"use_bidirectional_attention": request.param})
    return ref, dgemma.load_model(path, dtype=torch.float32), path


def _ref_logits(ref, ids, pv, pos, canvas):
    """One reference denoising step after the reference's own prefill, with generate()'s masks."""
    mm = (ids == IMAGE).long()
    torch.manual_seed(0)
    with torch.no_grad():
        out = ref(input_ids=ids, decoder_input_ids=canvas, pixel_values=pv, image_position_ids=pos,
                  mm_token_type_ids=mm, attention_mask=torch.ones_like(ids))
    return out.logits


@pytest.mark.parametrize("n_images", [1, 2])
def test_generate_token_identical(models, n_images):
    ref, model, _ = models
    ids, pv, pos = _inputs(n_images)
    assert ids.shape[1] > 3 * ref.config.text_config.sliding_window
    for seed in (0, 1, 2):
        want, _, _ = ref_generate(ref, ids, 24, seed, pixel_values=pv, image_position_ids=pos,
                                  mm_token_type_ids=(ids == IMAGE).long(), max_denoising_steps=12)
        got = model.generate(ids, pixel_values=pv, image_position_ids=pos, max_new_tokens=24, seed=seed,
                             rng="reference", max_denoising_steps=12)
        assert got.ids == want[0], seed
        assert len(got.steps) >= 1 and "vision_s" in got.timings


def test_images_change_the_output(models):
    _, model, _ = models
    ids, pv, pos = _inputs(1)
    a = model.canvas_logits(ids, torch.full((1, 8), 7), pixel_values=pv, image_position_ids=pos)
    b = model.canvas_logits(ids, torch.full((1, 8), 7), pixel_values=torch.flip(pv, dims=[1]),
                            image_position_ids=pos)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [5, 16, 1024])
def test_chunked_prefill_keeps_image_runs_whole(models, chunk):
    """Chunk boundaries move past image runs: every chunk size gives the unchunked logits."""
    _, model, _ = models
    ids, pv, pos = _inputs(2)
    canvas = torch.arange(8)[None] + 30
    whole = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    model.module.prefill_chunk = chunk
    try:
        chunked = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    finally:
        model.module.prefill_chunk = dgemma.model.PREFILL_CHUNK
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)


def test_images_argument_equals_processor_outputs(models):
    _, model, _ = models
    ids, pv, pos = _inputs(2)
    a = model.generate(ids, images=IMAGES, max_new_tokens=16, seed=3)
    b = model.generate(ids, pixel_values=pv, image_position_ids=pos, max_new_tokens=16, seed=3)
    assert a.ids == b.ids


def test_batch_rows_with_and_without_images(models):
    """A padded batch mixing an image prompt and a text prompt: each row's logits as when run alone."""
    _, model, _ = models
    ids, pv, pos = _inputs(1)
    text = torch.tensor([[2, 70, 71, 72, 73]])
    canvas = torch.arange(8)[None] + 30
    solo_img = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    solo_txt = model.canvas_logits(text, canvas)
    batch = [ids[0].tolist(), text[0].tolist()]
    events = list(model.stream(batch, pixel_values=pv, image_position_ids=pos, max_new_tokens=8, seed=[5, 6]))
    res = events[-1].results
    assert res[0].ids == model.generate(ids, pixel_values=pv, image_position_ids=pos, max_new_tokens=8, seed=5).ids
    assert res[1].ids == model.generate(text, max_new_tokens=8, seed=6).ids
    assert (solo_img - solo_txt).abs().max() > 1e-3  # the rows really differ


def test_mismatched_image_tokens(models):
    _, model, _ = models
    ids, pv, pos = _inputs(1)
    short = torch.cat([ids[:, :10], ids[:, 11:]], dim=1)  # one image token fewer
    with pytest.raises(ValueError, match="image tokens"):
        model.generate(short, pixel_values=pv, image_position_ids=pos, max_new_tokens=8, seed=0)
    with pytest.raises(ValueError, match="together"):
        model.generate(ids, pixel_values=pv, max_new_tokens=8)


def test_loader_vision_tensors(models, tmp_path):
    _, model, path = models
    assert model.vision is not None and model.image_processor.max_soft_tokens == PROCESSOR["max_soft_tokens"]
    text_only = dgemma.load_model(path, vision=False)
    assert text_only.vision is None
    ids, pv, pos = _inputs(1)
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.generate(ids, pixel_values=pv, image_position_ids=pos, max_new_tokens=8)
    tensors = load_file(path / "model.safetensors")
    key = "model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"
    assert key in tensors
    for name, edit in (("missing", lambda t: t.pop(key)),
                       ("shape", lambda t: t.__setitem__(key, torch.zeros(3, 3)))):
        bad = tmp_path / name
        bad.mkdir()
        for f in path.iterdir():
            if f.name != "model.safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        t = dict(tensors)
        edit(t)
        save_file(t, bad / "model.safetensors")
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            dgemma.load_model(bad)


def test_bidirectional_runs_matter(models):
    """With use_bidirectional_attention "vision", image runs see themselves: marking no token as vision
    (mm_token_type_ids all 0, as the reference reads it) gives causal attention and other logits."""
    ref, model, _ = models
    ids, pv, pos = _inputs(1)
    canvas = torch.arange(8)[None] + 30
    runs = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    causal = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos,
                                 mm_token_type_ids=torch.zeros_like(ids))
    differ = bool((runs - causal).abs().max() > 1e-4)
    assert differ == (ref.config.text_config.use_bidirectional_attention == "vision")


@pytest.mark.parametrize("scheme", ["int8", "nvfp4"])
def test_images_with_quantized_text_weights(models, tmp_path, scheme):
    """A quantized checkpoint keeps its vision tower dense: image prompts work and stay close to the unquantized
    model's logits (the text weights changed, the soft tokens did not)."""
    from dgemma.checkpoint.quantize import quantize_checkpoint

    _, model, path = models
    quantize_checkpoint(path, tmp_path / scheme, scheme)
    q = dgemma.load_model(tmp_path / scheme, dtype=torch.float32)
    assert q.vision is not None and q.quant_format is not None
    ids, pv, pos = _inputs(1)
    feats = q.vision(pv, pos)[0]
    assert torch.equal(feats, model.vision(pv, pos)[0])
    canvas = torch.arange(8)[None] + 30
    a = q.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    b = model.canvas_logits(ids, canvas, pixel_values=pv, image_position_ids=pos)
    assert torch.isfinite(a).all() and (a - b).abs().mean() < 0.5 * b.abs().mean()
    assert len(q.generate(ids, pixel_values=pv, image_position_ids=pos, max_new_tokens=16, seed=1).ids) > 0
