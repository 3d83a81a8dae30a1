"""The one assembly step every checkpoint reader feeds (safetensors, the quantized layouts, GGUF): the network built
on the meta device (quantized modules already swapped in), the dense weights the reader produced, and what comes
with them -> a checked, ready Pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import GenerationConfig
from ..errors import CheckpointError
from ..images import ImageProcessorConfig
from ..model import DiffusionGemma
from ..pipeline import Pipeline
from ..quant.lowbit import keep_16bit_storage
from ..quant.qtensor import QTensor
from ..tokenizer import Tokenizer
from ..vision import VisionEncoder
from .formats import QuantFormat
from .keys import DECODER, checkpoint_key

# Quantization scales (and 16-bit stored weights) beyond this are corruption: no trained model has weights near it,
# and such values overflow the activations into garbage. Checked at load with the NaN / infinity check.
SCALE_LIMIT = 1e6


@dataclass
class Parts:
    """What a reader found besides the dense weights."""

    source: Path
    generation_config: GenerationConfig
    tokenizer: Tokenizer | None = None
    quant_format: QuantFormat | None = None
    vision: VisionEncoder | None = None
    image_processor: ImageProcessorConfig | None = None
    replaced: set[str] = field(default_factory=set)  # parameters the reader swapped in as quantized modules


def assemble(model: DiffusionGemma, state: dict[str, torch.Tensor], parts: Parts, dtype: torch.dtype,
             compute_dtype: torch.dtype, device: torch.device, name_of=checkpoint_key) -> Pipeline:
    """Load `state` into `model` (every parameter but the quantized ones must be there; an absent encoder layer
    scalar starts at 1, as in the reference), keep 16-bit weights in 16 bits when computing in `compute_dtype`,
    refuse non-finite weights, and wrap the result. `name_of` names a missing parameter as the format stores it."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if n not in parts.replaced}
    missing = [n for n in expected if n not in state and not n.endswith("encoder_layer_scalar")]
    if missing:
        shown = ", ".join(name_of(n) for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{parts.source}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
    for n in expected:
        if n not in state:
            state[n] = torch.ones(expected[n], dtype=dtype, device=device)
    state.update({n: p for n, p in model.named_parameters() if n in parts.replaced})  # dense per-expert stacks
    model.load_state_dict(state, assign=True, strict=True)
    if compute_dtype != dtype:
        keep_16bit_storage(model, compute_dtype)
    check_finite(model, parts.source)
    model.vision = parts.vision
    model.requires_grad_(False)
    model.eval()
    return Pipeline(model, parts.generation_config, parts.tokenizer, parts.image_processor, str(parts.source),
                    parts.quant_format)


def _finite(t: torch.Tensor, limit: float = float("inf"), chunk: int = 1 << 24) -> bool:
    """Every value of `t` finite with |x| <= limit, checked a slice at a time (no full-size temporary)."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if part.dtype.itemsize == 1:  # float8: widen first (exactly)
            part = part.to(torch.float16)
        if not bool(torch.isfinite(part).all()) or (part.numel() and part.abs().max().item() > limit):
            return False
    return True


def check_finite(model: DiffusionGemma, source: Path) -> None:
    """Every floating-point weight, scale and quantized value of the model is finite (a cheap pass at load), so a
    corrupted checkpoint is a named error instead of silent garbage."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not _finite(p):
            raise CheckpointError(f"{source}: {checkpoint_key(name)} holds NaN or infinite values")
    for mname, module in model.named_modules():
        for attr, value in vars(module).items():
            if not isinstance(value, QTensor):
                continue
            for field_name, t in value.tensors().items():
                if t.is_floating_point() and not _finite(t, SCALE_LIMIT):
                    raise CheckpointError(f"{source}: the {field_name} of {DECODER}{mname}.{attr} ({value.scheme}) "
                                          f"holds NaN or infinite values, or values beyond {SCALE_LIMIT:g}")


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule `name` (dotted) of `model`: readers swap quantized modules in this way."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
