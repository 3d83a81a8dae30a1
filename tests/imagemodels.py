"""Tiny random DiffusionGemma checkpoints WITH a vision tower and an image-aware tokenizer, built with the reference
(`transformers`), and the reference's Gemma 4 processor on that tokenizer (the oracle for image prompts)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

from dgemma.tokenizer import Tokenizer, build_byte_tokenizer, save_tokenizer
from refmodels import text_config

# Gemma 4's image (and, for the reference processor's checks, audio) specials, after the byte tokenizer's 262 ids.
SPECIALS = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
            "boa_token": "<|audio>", "audio_token": "<|audio|>", "eoa_token": "<audio|>"}
BOI, IMAGE, EOI = 262, 263, 264
VOCAB = 272

# Gemma-style turns; image parts become the image placeholder, as in Gemma 4's template.
IMAGE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|image|>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# A tower small enough for tests (patch 4: a 12-pixel block per soft token), table wide enough for 70 soft tokens.
VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=8, position_embedding_size=256, patch_size=4,
)
PROCESSOR = {"max_soft_tokens": 70, "patch_size": 4, "pooling_kernel_size": 3}


def image_tokenizer(template: str | None = IMAGE_TEMPLATE) -> Tokenizer:
    """The byte-level tokenizer plus the image/audio specials (ids 262-267) and `image_token` in its config."""
    tok = build_byte_tokenizer()
    tok.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    config = {**tok.config, **SPECIALS, "chat_template": template}
    if template is None:
        config.pop("chat_template")
    return Tokenizer(tok.tok, config, template)


class _Processor(Gemma4Processor):
    def check_argument_for_proper_class(self, name, arg):  # no video processor (it needs torchvision)
        return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)


def reference_processor(tok: Tokenizer, max_soft_tokens: int = 70, patch_size: int = 4) -> Gemma4Processor:
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token="<bos>", eos_token="<eos>",
                                     pad_token="<pad>", extra_special_tokens=dict(SPECIALS))
    return _Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                      image_processor=Gemma4ImageProcessorPil(patch_size=patch_size, max_soft_tokens=max_soft_tokens),
                      tokenizer=hf_tok, video_processor=None, chat_template=tok.chat_template)


def build_vision_checkpoint(path: Path, seed: int = 0, vision: dict[str, Any] | None = None,
                            text: dict[str, Any] | None = None, canvas_length: int = 8,
                            ) -> tuple[DiffusionGemmaForBlockDiffusion, Path]:
    """A random reference model with a vision tower, saved with the image tokenizer and processor_config.json.
    All weights are randomised (norm weights around 1) so that images visibly change the logits."""
    cfg = DiffusionGemmaConfig(
        text_config=text_config({"vocab_size": VOCAB, "use_bidirectional_attention": "vision", **(text or {})}),
        vision_config={**VISION, **(vision or {})}, canvas_length=canvas_length,
        boi_token_id=BOI, image_token_id=IMAGE, eoi_token_id=EOI)
    torch.manual_seed(seed)
    m = DiffusionGemmaForBlockDiffusion(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "vision" in n else 0.15)
        for n, b in m.named_buffers():
            if "layer_scalar" in n:
                b.copy_(0.8 + 0.4 * torch.rand_like(b))
    m.generation_config.eos_token_id = [1, 5]
    m.generation_config.pad_token_id = 0
    path = Path(path)
    m.save_pretrained(path)
    save_tokenizer(image_tokenizer(), path)
    (path / "processor_config.json").write_text(json.dumps({"image_processor": PROCESSOR}), encoding="utf-8")
    return m, path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds no pixel data (zero-size images, decompression bombs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
