"""Image preprocessing against the reference's Gemma 4 image processor (Pillow variant), plus bad input; image
prompts (chat messages with image parts, data: URLs, raw prompts) against the reference's Gemma 4 processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from dgemma.images import (
    ImageError,
    ImageProcessorConfig,
    aspect_preserving_size,
    chat_prompt,
    decode_data_url,
    extract_images,
    preprocess_images,
    text_prompt,
)
from dgemma.tokenizer import BYTE_CHAT_TEMPLATE, TokenizerError
from imagemodels import BOI, EOI, IMAGE, image_tokenizer, png_header, reference_processor


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    # A smooth gradient on top of the noise, so resampling errors show up in more than the noise floor.
    arr = (arr // 2 + (np.arange(width)[None, :, None] * 127 // max(width - 1, 1))).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _reference(images, **kwargs):
    out = Gemma4ImageProcessorPil(**kwargs)(images, return_tensors="np")
    return out["pixel_values"], out["image_position_ids"], list(out["num_soft_tokens_per_image"])


def _assert_same(ours, ref):
    px, pos, n = ref
    assert ours["pixel_values"].dtype == torch.float32
    assert ours["pixel_values"].shape == px.shape
    np.testing.assert_allclose(ours["pixel_values"].numpy(), px, rtol=0, atol=1e-6)
    assert torch.equal(ours["image_position_ids"], torch.from_numpy(np.asarray(pos)).long())
    assert ours["num_soft_tokens"] == n


@pytest.mark.parametrize("size,mode", [
    ((640, 480), "RGB"),     # downscaled landscape
    ((300, 700), "RGB"),     # portrait
    ((50, 37), "RGB"),       # tiny: upscaled
    ((1000, 20), "RGB"),     # extreme aspect: the short side rounds to zero -> one block
    ((16, 900), "RGB"),      # extreme portrait
    ((200, 120), "RGBA"),    # alpha composited onto white
    ((123, 77), "L"),        # grayscale
    ((96, 48), "LA"),        # grayscale + alpha
])
@pytest.mark.parametrize("max_soft_tokens", [70, 280])
def test_matches_reference(size, mode, max_soft_tokens):
    img = _noise(*size, mode=mode, seed=size[0])
    ours = preprocess_images([img], max_soft_tokens=max_soft_tokens)
    _assert_same(ours, _reference([img], max_soft_tokens=max_soft_tokens))
    n = ours["num_soft_tokens"][0]
    assert 0 < n <= max_soft_tokens
    valid = (ours["image_position_ids"][0] >= 0).all(-1)
    assert int(valid.sum()) == n * 9
    assert float(ours["pixel_values"].min()) >= 0 and float(ours["pixel_values"].max()) <= 1


def test_exact_size_not_resized_and_batch_of_mixed_sizes():
    exact = _noise(480, 336, seed=3)  # exactly the 70-token budget: not resized at 70
    imgs = [exact, _noise(333, 222, seed=4), _noise(64, 640, "L", seed=5)]
    for mst in (70, 140, 560):
        _assert_same(preprocess_images(imgs, max_soft_tokens=mst), _reference(imgs, max_soft_tokens=mst))
    small = [imgs[2]]  # the largest budget on one image keeps the test fast
    _assert_same(preprocess_images(small, max_soft_tokens=1120), _reference(small, max_soft_tokens=1120))


def test_small_patch_size_matches_reference():
    # The test checkpoints use patch 4 (blocks of 12 pixels); the processor follows the checkpoint's patch size.
    imgs = [_noise(50, 30, seed=6), _noise(7, 90, "RGBA", seed=7)]
    cfg = ImageProcessorConfig(max_soft_tokens=70, patch_size=4)
    ours = preprocess_images(imgs, config=cfg)
    _assert_same(ours, _reference(imgs, max_soft_tokens=70, patch_size=4))
    assert ours["pixel_values"].shape == (2, 70 * 9, 4 * 4 * 3)


def test_patch_layout_and_positions():
    # 336x480 pixels = 7x10 blocks of 48 = exactly the 70-token budget: no resize. Patch k covers rows 16*y..,
    # cols 16*x.., values laid out (py, px, c); positions are (x = column, y = row), row-major.
    arr = np.random.default_rng(1).integers(0, 256, size=(336, 480, 3), dtype=np.uint8)
    out = preprocess_images(Image.fromarray(arr), max_soft_tokens=70)
    pos = out["image_position_ids"][0]
    assert out["num_soft_tokens"] == [70]
    assert pos.tolist() == [[x, y] for y in range(21) for x in range(30)]
    for x, y in ((0, 0), (17, 13), (29, 20)):
        want = arr[16 * y:16 * y + 16, 16 * x:16 * x + 16].astype(np.float64).reshape(-1) / 255
        np.testing.assert_allclose(out["pixel_values"][0, y * 30 + x].numpy(), want, atol=1e-7)
    # A smaller budget pads: zero pixels, position (-1, -1) after the real patches.
    small = preprocess_images(Image.fromarray(arr[:48, :96]), max_soft_tokens=140)
    n = small["num_soft_tokens"][0] * 9
    assert (small["image_position_ids"][0, n:] == -1).all() and (small["pixel_values"][0, n:] == 0).all()
    assert (small["image_position_ids"][0, :n] >= 0).all() and n < 140 * 9


def test_inputs_path_bytes_and_first_frame(tmp_path):
    img = _noise(120, 90, seed=2)
    path = tmp_path / "a.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    a = preprocess_images([img, str(path), path, buf.getvalue()], max_soft_tokens=70)
    for i in (1, 2, 3):
        assert torch.equal(a["pixel_values"][i], a["pixel_values"][0])
    # An animated GIF uses its first frame.
    frames = [Image.new("RGB", (60, 60), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first = preprocess_images(frames[0], max_soft_tokens=70)
    assert torch.equal(preprocess_images(gif.getvalue(), max_soft_tokens=70)["pixel_values"], first["pixel_values"])
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):  # APNG and animated WebP too
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
        assert Image.open(io.BytesIO(buf.getvalue())).is_animated
        got = preprocess_images(buf.getvalue(), max_soft_tokens=70)["pixel_values"]
        assert torch.equal(got, first["pixel_values"]), fmt


def test_aspect_size_rules():
    for h in range(1, 400, 37):
        for w in range(1, 2000, 113):
            for mst in (70, 280):
                th, tw = aspect_preserving_size(h, w, 16, mst * 9, 3)
                assert th % 48 == 0 and tw % 48 == 0 and th > 0 and tw > 0
                assert (th // 16) * (tw // 16) <= mst * 9


def test_processor_config_from_dir(tmp_path):
    assert ImageProcessorConfig.from_dir(tmp_path) == ImageProcessorConfig()
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 560, "patch_size": 16}}')
    assert ImageProcessorConfig.from_dir(tmp_path).max_soft_tokens == 560
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 300}}')
    with pytest.raises(ValueError, match="max_soft_tokens"):
        ImageProcessorConfig.from_dir(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json"):
        ImageProcessorConfig.from_dir(tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        preprocess_images(b"definitely not an image")
    buf = io.BytesIO()
    _noise(300, 300, seed=9).save(buf, format="PNG")
    with pytest.raises(ImageError, match="image 1: .*cannot decode"):
        preprocess_images([_noise(20, 20), buf.getvalue()[: len(buf.getvalue()) // 2]])
    with pytest.raises(ImageError, match="no such image file"):
        preprocess_images(tmp_path / "missing.png")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImageError, match="x.txt: cannot identify the image"):
        preprocess_images(str(tmp_path / "x.txt"))
    with pytest.raises(ImageError, match="empty image"):
        preprocess_images(Image.new("RGB", (0, 10)))
    with pytest.raises(ImageError, match="zero pixels"):
        preprocess_images(png_header(0, 10))
    with pytest.raises(ImageError, match="too many pixels"):  # Pillow's own bomb check, from the header alone
        preprocess_images(png_header(30000, 30000))
    with pytest.raises(ImageError, match="9000x9000 pixels exceed the limit"):
        preprocess_images(png_header(9000, 9000))
    with pytest.raises(ImageError, match="exceed the limit"):
        preprocess_images(_noise(100, 100), max_pixels=99 * 100)
    with pytest.raises(ImageError, match="unsupported image input"):
        preprocess_images([np.zeros((4, 4, 3))])
    with pytest.raises(ImageError, match="no images"):
        preprocess_images([])
    with pytest.raises(ValueError, match="max_soft_tokens"):
        preprocess_images(_noise(10, 10), max_soft_tokens=100)


# -- image prompts -----------------------------------------------------------------------------------------------
def _model(template=None, vision=True):
    """What the prompt builders read from a loaded model (tokenizer, vision ids, processor settings)."""
    from types import SimpleNamespace

    tok = image_tokenizer() if template is None else image_tokenizer(template)
    return SimpleNamespace(tokenizer=tok, vision=object() if vision else None,
                           image_processor=ImageProcessorConfig(70, 4, 3),
                           config=SimpleNamespace(boi_token_id=BOI, image_token_id=IMAGE, eoi_token_id=EOI))


def _data_url(img: Image.Image, fmt: str = "PNG") -> str:
    import base64

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_prompt_matches_reference_processor():
    model = _model()
    imgs = [_noise(50, 30, seed=1), _noise(13, 200, seed=2), _noise(64, 64, "RGBA", seed=3)]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": imgs[0]}, {"type": "text", "text": "and"},
                                     {"type": "image", "image": imgs[1]}, {"type": "text", "text": " compare"}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "Now this: "}, {"type": "image", "image": imgs[2]}]},
    ]
    want = reference_processor(model.tokenizer).apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    got = chat_prompt(model, messages)
    assert got.ids == list(want["input_ids"][0])
    assert got.images["num_soft_tokens"] == [sum(1 for t in got.ids[s:e] if t == IMAGE) for s, e in
                                             zip(_at(got.ids, BOI), _at(got.ids, EOI))]
    np.testing.assert_allclose(got.images["pixel_values"].numpy(), np.asarray(want["pixel_values"]), rtol=0, atol=1e-6)
    assert torch.equal(got.images["image_position_ids"], torch.as_tensor(np.asarray(want["image_position_ids"])))
    assert set(got.image_inputs()) == {"pixel_values", "image_position_ids"}
    # The same images as OpenAI image_url parts with data: URLs, or as bare parts plus a list, give the same prompt.
    openai_msgs = [dict(m) for m in messages]
    for m in openai_msgs:
        if isinstance(m["content"], list):
            m["content"] = [{"type": "image_url", "image_url": {"url": _data_url(p["image"])}} if p["type"] == "image"
                            else p for p in m["content"]]
    assert chat_prompt(model, openai_msgs).ids == got.ids
    bare, images = extract_images(messages)
    assert all(p == {"type": "image"} for m in bare if isinstance(m["content"], list) for p in m["content"]
               if p["type"] == "image")
    assert chat_prompt(model, bare, images).ids == got.ids


def _at(ids, token):
    return [i for i, t in enumerate(ids) if t == token]


def test_chat_prompt_template_without_image_parts():
    """A template that prints the content as a string gets each message flattened, the placeholder inline."""
    model = _model(BYTE_CHAT_TEMPLATE)
    img = _noise(40, 40)
    p = chat_prompt(model, [{"role": "user", "content": [{"type": "text", "text": "see "},
                                                         {"type": "image", "image": img},
                                                         {"type": "text", "text": " ok"}]}])
    n = p.images["num_soft_tokens"][0]
    tok = model.tokenizer
    assert p.ids == (tok.encode("<bos><start_of_turn>user\nsee ") + [BOI] + [IMAGE] * n + [EOI]
                     + tok.encode(" ok<end_of_turn>\n<start_of_turn>model\n"))
    # Text-only part lists are joined into a string; no image, no pixels.
    two_texts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    t = chat_prompt(model, [{"role": "user", "content": two_texts}])
    assert t.ids == tok.encode_chat([{"role": "user", "content": "ab"}]) and t.images is None and t.image_inputs() == {}


def test_text_prompt_placeholders():
    model = _model()
    tok = model.tokenizer
    a, b = _noise(30, 30, seed=4), _noise(90, 20, seed=5)
    p = text_prompt(model, "x<|image|>y<|image|>", [a, b])
    na, nb = p.images["num_soft_tokens"]
    assert p.ids == tok.encode("x") + [BOI] + [IMAGE] * na + [EOI] + tok.encode("y") + [BOI] + [IMAGE] * nb + [EOI]
    assert text_prompt(model, "hi", [a]).ids == [BOI] + [IMAGE] * na + [EOI] + tok.encode("hi")  # images first
    assert text_prompt(model, "hi").ids == tok.encode("hi")
    with pytest.raises(TokenizerError, match="2 image placeholder.*for 1 image"):
        text_prompt(model, "<|image|><|image|>", [a])


def test_prompt_errors():
    img = _noise(20, 20)
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ImageError, match="1 image part.*2 image"):
        chat_prompt(_model(), msg, [img, img])
    with pytest.raises(ImageError, match="carries no image"):
        chat_prompt(_model(), msg)
    with pytest.raises(ImageError, match="no vision tower"):
        chat_prompt(_model(vision=False), msg, [img])
    with pytest.raises(TokenizerError, match="contains the image placeholder"):
        chat_prompt(_model(), [{"role": "user", "content": [{"type": "text", "text": "a <|image|>"},
                                                            {"type": "image"}]}], [img])
    with pytest.raises(TokenizerError, match="'audio' are not supported"):
        chat_prompt(_model(), [{"role": "user", "content": [{"type": "audio"}, {"type": "image"}]}], [img])
    with pytest.raises(ImageError, match="image 0: .*not an image"):
        chat_prompt(_model(), [{"role": "user", "content": [{"type": "image", "image": b"junk"}]}])


def test_data_urls_and_limits(tmp_path):
    img = _noise(20, 10)
    url = _data_url(img)
    assert preprocess_images(decode_data_url(url))["num_soft_tokens"] == preprocess_images(img)["num_soft_tokens"]
    assert decode_data_url(url[:30] + "\n" + url[30:]) == decode_data_url(url)  # line breaks in base64 are fine
    for bad, why in [("https://example.com/cat.png", "remote image URLs are not fetched"),
                     ("HTTP://example.com/cat.png", "remote image URLs are not fetched"),
                     ("file:///etc/passwd", "must be a data: URL"),
                     ("/etc/passwd", "must be a data: URL"),
                     ("data:image/png;base64", "no comma"),
                     ("data:text/plain;base64,aGk=", "not an image"),
                     ("data:image/png,rawbytes", "base64-encoded"),
                     ("data:image/png;base64,@@@@", "not valid base64"),
                     ("data:image/png;base64,", "no bytes")]:
        with pytest.raises(ImageError, match=why):
            decode_data_url(bad)
    # A server passes allow_paths=False: strings are data: URLs only (never a file on the server), objects refused.
    path = tmp_path / "a.png"
    img.save(path)
    for part in ({"type": "image", "image": str(path)}, {"type": "image", "path": str(path)},
                 {"type": "image_url", "image_url": {"url": str(path)}}, {"type": "image_url", "image_url": 3}):
        with pytest.raises(ImageError, match="data:"):
            extract_images([{"role": "user", "content": [part]}], allow_paths=False)
    assert extract_images([{"role": "user", "content": [{"type": "image", "path": str(path)}]}])[1] == [str(path)]
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 2}]
    with pytest.raises(ImageError, match="more than 1 image"):
        extract_images(two, allow_paths=False, max_images=1)
    size = len(decode_data_url(url))
    with pytest.raises(ImageError, match=f"exceed {2 * size - 1} bytes"):
        extract_images(two, allow_paths=False, max_bytes=2 * size - 1)
    assert len(extract_images(two, allow_paths=False, max_images=2, max_bytes=2 * size)[1]) == 2
