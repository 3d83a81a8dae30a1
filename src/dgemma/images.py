"""Image preprocessing for DiffusionGemma's vision tower (Pillow + numpy, no torchvision).

Each image becomes a fixed-size bag of patches:
  1. decode (PIL.Image, path or bytes), first frame of animations, transparency composited onto white, RGB;
  2. aspect-preserving bicubic resize (Pillow's, antialiased) to the largest size with at most
     `max_soft_tokens * pooling**2` patches whose sides are multiples of `pooling * patch` (48 by default);
     small images are upscaled;
  3. rescale to [0, 1] (no mean/std: the tower maps x to 2x - 1 itself);
  4. row-major patches, each a (py, px, channel) vector of patch*patch*3 values, with (x = column, y = row) positions;
  5. padding to the budget with zero pixels and position (-1, -1).
After the tower's 3x3 pooling an image of H x W pixels gives (H / 48) * (W / 48) soft tokens.

Prompts with images (`chat_prompt`, `text_prompt`): the images are preprocessed and each image placeholder of the
prompt becomes begin-of-image, that image's soft-token count of image ids, end-of-image; the result is the prompt
ids plus the processor outputs, ready for `model.generate(ids, **prompt.image_inputs())`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .limits import DEFAULT_MAX_PIXELS  # decoded images above this many pixels are refused before decoding

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_MAX_SOFT_TOKENS = 280

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]


class ImageError(ValueError):
    """An image that cannot be used: unreadable, corrupt, unsupported, empty or too large."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS
    patch_size: int = 16
    pooling_kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        for name in ("patch_size", "pooling_kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        """Read the checkpoint's processor settings: `processor_config.json` (nested under "image_processor") or
        `preprocessor_config.json` (flat). Missing files or fields keep the defaults."""
        path = Path(path)
        fields: dict[str, Any] = {}
        for name, nested in (("preprocessor_config.json", False), ("processor_config.json", True)):
            f = path / name
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from e
            if nested:
                data = data.get("image_processor", {}) if isinstance(data, dict) else {}
            if not isinstance(data, dict):
                raise ValueError(f"{f}: expected a JSON object")
            for key in ("max_soft_tokens", "patch_size", "pooling_kernel_size"):
                if key in data:
                    fields[key] = data[key]
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{path}: processor config: {e}") from e


def aspect_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                           pooling_kernel_size: int) -> tuple[int, int]:
    """The largest (height, width) with sides multiples of pooling*patch and at most max_patches patches,
    keeping the aspect ratio; a side that would round to zero becomes one block (the other side then follows the
    aspect ratio, capped by the budget)."""
    side = pooling_kernel_size * patch_size
    target_px = max_patches * patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    max_side = (max_patches // pooling_kernel_size ** 2) * side
    if th == 0 and tw == 0:
        raise ImageError(f"cannot resize a {width}x{height} image to a non-empty multiple of {side} pixels")
    if th == 0:
        th, tw = side, min((width // height) * side, max_side)
    elif tw == 0:
        th, tw = min((height // width) * side, max_side), side
    if th * tw > target_px:  # cannot happen with the rules above; a guard against silent over-budget output
        raise ImageError(f"resizing {width}x{height} to {tw}x{th} exceeds {max_patches} patches")
    return th, tw


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (first frame) into RGB, compositing transparency onto white. Raises ImageError."""
    if isinstance(image, Image.Image):
        img, name = image, "image"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img, name = _open(io.BytesIO(bytes(image)), "image bytes"), "image bytes"
    elif isinstance(image, (str, os.PathLike)):
        name = str(image)
        if not Path(name).is_file():
            raise ImageError(f"{name}: no such image file")
        img = _open(name, name)
    else:
        raise ImageError(f"unsupported image input of type {type(image).__name__} "
                         "(expected PIL.Image, a path or bytes)")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} pixels exceed the limit of {max_pixels}")
    try:
        if getattr(img, "is_animated", False):  # (n_frames would walk through every frame)
            img.seek(0)  # animations: the first frame only
        img.load()
        has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from e


def _open(source: Any, name: str) -> Image.Image:
    try:
        # Pillow's own bomb check reads the header only; our explicit pixel limit follows in load_image.
        return Image.open(source)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: cannot identify the image (not an image, an unsupported format, or an empty "
                         "image of zero pixels)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels ({e})") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot read image ({e})") from e


def image_to_patches(img: Image.Image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """RGB image -> (patches [max_patches, p*p*3] float32, positions [max_patches, 2] int64, soft tokens)."""
    p = cfg.patch_size
    width, height = img.size
    th, tw = aspect_preserving_size(height, width, p, cfg.max_patches, cfg.pooling_kernel_size)
    if (th, tw) != (height, width):
        img = img.resize((tw, th), resample=Image.Resampling.BICUBIC)
    # uint8 -> float64 * (1/255) -> float32, the same rounding as the reference processor.
    pixels = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    gh, gw = th // p, tw // p
    patches = pixels.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * 3)
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    positions = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.int64)
    n = gh * gw
    out_pixels = np.zeros((cfg.max_patches, p * p * 3), dtype=np.float32)
    out_pos = np.full((cfg.max_patches, 2), -1, dtype=np.int64)
    out_pixels[:n] = patches
    out_pos[:n] = positions
    return out_pixels, out_pos, n // cfg.pooling_kernel_size ** 2


def preprocess_images(
    images: ImageInput | Sequence[ImageInput],
    max_soft_tokens: int | None = None,
    *,
    config: ImageProcessorConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Images -> {"pixel_values": [n, patches, p*p*3] float32, "image_position_ids": [n, patches, 2] int64,
    "num_soft_tokens": [int] * n}. `max_soft_tokens` overrides the config's (default 280)."""
    cfg = config or ImageProcessorConfig()
    if max_soft_tokens is not None:
        cfg = ImageProcessorConfig(max_soft_tokens, cfg.patch_size, cfg.pooling_kernel_size)
    if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
        images = [images]
    images = list(images)
    if not images:
        raise ImageError("no images given")
    pixels, positions, counts = [], [], []
    for i, image in enumerate(images):
        try:
            px, pos, n = image_to_patches(load_image(image, max_pixels), cfg)
        except ImageError as e:
            raise ImageError(f"image {i}: {e}") from e
        pixels.append(px)
        positions.append(pos)
        counts.append(n)
    return {
        "pixel_values": torch.from_numpy(np.stack(pixels)),
        "image_position_ids": torch.from_numpy(np.stack(positions)),
        "num_soft_tokens": counts,
    }


# -- images in messages and prompts ---------------------------------------------------------------------------------
def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (data:image/png;base64,...). Remote URLs are refused: nothing is fetched."""
    if not isinstance(url, str):
        raise ImageError(f"an image URL must be a string, got {type(url).__name__}")
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp"):
        raise ImageError(f"remote image URLs are not fetched ({scheme}://...); send the image inline as a "
                         "data: URL (data:image/png;base64,...)")
    if scheme != "data":
        raise ImageError("an image URL must be a data: URL (data:image/png;base64,...)")
    header, comma, payload = url.split(":", 1)[1].partition(",")
    if not comma:
        raise ImageError("malformed data: URL (no comma before the data)")
    params = [x.strip().lower() for x in header.split(";")]
    if params[0] and not params[0].startswith("image/"):
        raise ImageError(f"the data: URL holds {params[0]!r}, not an image")
    if "base64" not in params[1:]:
        raise ImageError("the data: URL must be base64-encoded (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64 ({e})") from None
    if not data:
        raise ImageError("the data: URL holds no bytes")
    return data


def _encoded_size(part: dict[str, Any]) -> int:
    """The bytes an image part carries, measured before decoding (a data: URL's payload as 3/4 of its length)."""
    ref = part.get("image_url") if part.get("type") == "image_url" else next(
        (part[k] for k in ("image", "url", "path") if k in part), None)
    if isinstance(ref, dict):
        ref = ref.get("url")
    if isinstance(ref, str) and ref[:5].lower() == "data:":
        return len(ref.partition(",")[2]) * 3 // 4
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return len(ref)
    return 0


def _part_image(part: dict[str, Any], allow_paths: bool) -> ImageInput:
    """The image a content part carries: OpenAI {"type": "image_url", "image_url": {"url": ...}} or
    {"type": "image", "image" | "url" | "path": ...}. URLs must be data: URLs; local paths and in-memory images
    only with `allow_paths` (never for a server)."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ImageError('an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}')
        return decode_data_url(url)
    key = next((k for k in ("image", "url", "path") if k in part), None)
    if key is None:
        raise ImageError('an image part carries no image (expected "image", "url" or "path")')
    value = part[key]
    if isinstance(value, str) and (not allow_paths or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", value)):
        return decode_data_url(value)  # a URL (for a server: any string)
    if not allow_paths:
        raise ImageError("an image part must hold a data: URL")
    return value


def extract_images(messages: Sequence[dict[str, Any]], *, allow_paths: bool = True, max_images: int | None = None,
                   max_bytes: int | None = None) -> tuple[list[dict[str, Any]], list[ImageInput]]:
    """Messages -> (the same messages with every image part reduced to {"type": "image"}, the images in order).
    The count and encoded-size limits are checked before anything is decoded."""
    out, images, total = [], [], 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in ("image", "image_url")):
                parts.append(part)
                continue
            if max_images is not None and len(images) >= max_images:
                raise ImageError(f"more than {max_images} image(s) in the request (the limit)")
            total += _encoded_size(part)
            if max_bytes is not None and total > max_bytes:
                raise ImageError(f"the request's images exceed {max_bytes} bytes (the limit)")
            try:
                images.append(_part_image(part, allow_paths))
            except ImageError as e:
                raise ImageError(f"messages[{i}]: image {len(images)}: {e}") from None
            parts.append({"type": "image"})
        out.append({**m, "content": parts})
    return out, images


@dataclass
class Prompt:
    """Prompt ids with begin-of-image, N image ids and end-of-image per image, and the processor outputs."""

    ids: list[int]
    images: dict[str, Any] | None = None  # preprocess_images output, None for a text-only prompt

    def image_inputs(self) -> dict[str, Any]:
        """Keyword arguments for model.generate / stream / canvas_logits."""
        if self.images is None:
            return {}
        return {"pixel_values": self.images["pixel_values"], "image_position_ids": self.images["image_position_ids"]}


def _vision_ids(model) -> tuple[int, int, int]:
    cfg = model.config
    ids = (cfg.boi_token_id, cfg.image_token_id, cfg.eoi_token_id)
    if model.vision is None or any(i is None for i in ids):
        raise ImageError("this model has no vision tower: image input is not available")
    return ids  # type: ignore[return-value]


def _process(model, images: Sequence[ImageInput], max_soft_tokens: int | None,
             max_pixels: int) -> tuple[dict[str, Any] | None, list[list[int]]]:
    if not images:
        return None, []
    boi, image, eoi = _vision_ids(model)
    processed = preprocess_images(list(images), max_soft_tokens,
                                  config=model.image_processor, max_pixels=max_pixels)
    runs = [[boi] + [image] * n + [eoi] for n in processed["num_soft_tokens"]]
    return processed, runs


def _tokenizer(model):
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass prompt ids and pixel_values instead")
    return model.tokenizer


def chat_prompt(model, messages: Sequence[dict[str, Any]], images: Sequence[ImageInput] | None = None, *,
                max_soft_tokens: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                add_generation_prompt: bool = True) -> Prompt:
    """Chat messages (content: a string or text and image parts) -> Prompt. Image parts carry their image
    ("image": PIL.Image / path / bytes, "url"/"path", or OpenAI's image_url with a data: URL), or are bare
    {"type": "image"} and take the next of `images` in order."""
    tok = _tokenizer(model)
    messages, carried = extract_images(messages) if images is None else (list(messages), [])
    images = carried if images is None else list(images)
    n_parts = sum(1 for m in messages if isinstance(m.get("content"), list)
                  for p in m["content"] if isinstance(p, dict) and p.get("type") == "image")
    if n_parts != len(images):
        raise ImageError(f"the messages have {n_parts} image part(s) but {len(images)} image(s) were given")
    processed, runs = _process(model, images, max_soft_tokens, max_pixels)
    text = tok.apply_chat_template_images(list(messages), len(images), add_generation_prompt)
    return Prompt(tok.encode_with_images(text, runs) if images else tok.encode(text), processed)


def text_prompt(model, text: str, images: Sequence[ImageInput] = (), *, max_soft_tokens: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Prompt:
    """A raw prompt with images: each image placeholder (the tokenizer's image token, "<|image|>") marks where
    the next image goes; without placeholders the images go first, in order."""
    tok = _tokenizer(model)
    images = list(images)
    if not images:
        return Prompt(tok.encode(text))
    if tok.image_token not in text:
        text = tok.image_token * len(images) + text
    processed, runs = _process(model, images, max_soft_tokens, max_pixels)
    return Prompt(tok.encode_with_images(text, runs), processed)
