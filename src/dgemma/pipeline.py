"""A loaded model: the network that holds the weights, and what generation needs around it (tokenizer, generation
defaults, image processor, where it came from). `load_model` and `random_model` return one; the generation loop,
the server, batch jobs and tasks take one. The network itself (`.module`) is a plain nn.Module: training, LoRA and
the quantizer work on it directly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint.formats import QuantFormat
from .config import GenerationConfig, ModelConfig
from .generate import GenerationResult, generate, stream
from .images import ImageProcessorConfig
from .model import DiffusionGemma
from .tokenizer import Tokenizer
from .vision import VisionEncoder, prompt_images


@dataclass(eq=False)
class Pipeline:
    module: DiffusionGemma
    generation_config: GenerationConfig
    tokenizer: Tokenizer | None = None
    image_processor: ImageProcessorConfig | None = None
    source: str = ""  # the checkpoint directory or GGUF file, or "random:<preset>"
    quant_format: QuantFormat | None = None  # the checkpoint's quantized layout; None for plain weights

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def vision(self) -> VisionEncoder | None:
        return self.module.vision

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype."""
        return self.module.dtype

    def generate(self, prompt_ids, **kwargs) -> GenerationResult:
        """Block-diffusion generation; see dgemma.generate.generate."""
        return generate(self, prompt_ids, **kwargs)

    def stream(self, prompt_ids, **kwargs):
        """Yields Draft events after every denoising step and a Commit per canvas; see dgemma.generate.stream."""
        return stream(self, prompt_ids, **kwargs)

    @torch.inference_mode()
    def canvas_logits(
        self,
        prompt_ids: torch.Tensor,
        canvas_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C, V] (fp32, softcapped) of one denoising step after prefilling `prompt_ids` (with its
        images' `pixel_values` / `image_position_ids` from `preprocess_images`, when it has image tokens)."""
        vocab, device = self.config.vocab_size, self.device
        prompt_ids = check_ids(prompt_ids, "prompt_ids", vocab, device)
        canvas_ids = check_ids(canvas_ids, "canvas_ids", vocab, device)
        if canvas_ids.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"canvas_ids batch {canvas_ids.shape[0]} != prompt_ids batch {prompt_ids.shape[0]}")
        if self_conditioning_logits is not None:
            want = (*canvas_ids.shape, vocab)
            if tuple(self_conditioning_logits.shape) != want:
                raise ValueError(f"self_conditioning_logits must have shape {list(want)}, "
                                 f"got {list(self_conditioning_logits.shape)}")
            self_conditioning_logits = self_conditioning_logits.to(device)  # softmax in fp32, then cast
        images = prompt_images(self, prompt_ids, None, pixel_values, image_position_ids, mm_token_type_ids)
        cache = self.module.new_cache(prompt_ids.shape[0], prompt_ids.shape[1], scratch=canvas_ids.shape[1])
        self.module.encode(prompt_ids, cache, images=images)
        return self.module.decode(canvas_ids, cache, self_conditioning_logits)


def check_ids(ids, name: str, vocab: int, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.LongTensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be 2-D [batch, length] with length >= 1, got shape {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer ids, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab})")
    return ids.to(device=device, dtype=torch.long)
