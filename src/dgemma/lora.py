"""LoRA adapters on the model's linear layers, saved with PEFT's file names and key naming, mergeable into the
base weights.

Adapters go on the text stack's projections, on the vision tower's, or on both (`parts`). adapter_config.json
names the adapted modules with one regular expression over their full module paths, so PEFT wraps exactly the
modules that have an adapter (a bare `q_proj` would also match the vision tower's clippable linears, which PEFT
cannot wrap). With PEFT, merge the adapter (`merge_and_unload()`): the reference's encoder and decoder share the
text weights and PEFT wraps only the decoder's modules, so only the merged model applies the adapter in both
roles, as dgemma does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import Linear
from .numerics import linear
from .checkpoint.keys import checkpoint_key

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = {"text": ("text",), "vision": ("vision",), "both": ("text", "vision")}
VISION = "vision"  # the vision tower's attribute on DiffusionGemma; its checkpoint prefix is model.encoder.


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * x A^T B^T, with W frozen; B starts at zero so training starts from the base."""

    def __init__(self, base: Linear | nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        out_f, in_f = base.weight.shape
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.base.weight) + linear(linear(x, self.lora_A), self.lora_B) * self.scale
        bias = getattr(self.base, "bias", None)
        return y if bias is None else y + bias

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


def _part(name: str) -> str:
    return "vision" if name == VISION or name.startswith(VISION + ".") else "text"


def _candidates(model: nn.Module, targets, parts) -> list[tuple[nn.Module, str, str]]:
    """(parent, child name, full name) of each linear layer LoRA may wrap in `parts`: the text stack's `Linear`
    layers named in `targets`, and the vision tower's `.linear` inside a clippable linear named in `targets`."""
    found = []
    for name, module in model.named_modules():
        part = _part(name)
        if part not in parts:
            continue
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if part == "text" and isinstance(child, Linear) and child_name in targets:
                found.append((module, child_name, full))
            elif (part == "vision" and isinstance(child, nn.Linear) and child_name == "linear"
                  and name.rsplit(".", 1)[-1] in targets):
                found.append((module, child_name, full))
    return found


def lora_parts(parts: str) -> tuple[str, ...]:
    """"text" / "vision" / "both" -> the parts it names."""
    if parts not in PARTS:
        raise ValueError(f"LoRA targets must be one of {', '.join(PARTS)}, got {parts!r}")
    return PARTS[parts]


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
               generator: torch.Generator | None = None, parts: str = "text") -> list[str]:
    """Freeze the model and wrap the target linear layers of `parts` ("text", "vision" or "both"); returns the
    wrapped module names. `generator` makes the adapters' initialisation reproducible."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    wanted = lora_parts(parts)
    if "vision" in wanted and model.vision is None:
        raise ValueError("LoRA on the vision tower: this model has no vision tower")
    found = _candidates(model, targets, wanted)
    if not found:
        raise ValueError(f"no linear layers named {list(targets)} found in the {' and '.join(wanted)} part")
    model.requires_grad_(False)
    names = []
    for parent, child_name, full in found:
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha, generator))
        names.append(full)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def module_path(name: str) -> str:
    """dgemma module name -> the module's path in the checkpoint and in the reference model."""
    if _part(name) == "vision":
        return "model.encoder." + name[len(VISION) + 1:]
    return checkpoint_key(name + ".weight")[: -len(".weight")]


def peft_prefix(name: str) -> str:
    """dgemma module name -> PEFT key prefix (base_model.model.<module path>)."""
    return "base_model.model." + module_path(name)


def target_pattern(names) -> str:
    """A regular expression (PEFT full-matches it against module paths) for these modules' kinds, layer indices
    generalised: model\\.decoder\\.layers\\.\\d+\\.self_attn\\.q_proj|..."""
    kinds = sorted({re.sub(r"\.\d+\.", ".N.", module_path(n)) for n in names})
    return "|".join(re.escape(k).replace(r"\.N\.", r"\.\d+\.") for k in kinds)


def save_adapter(model: nn.Module, out: Path, base_path: str = "") -> None:
    """Write the attached adapters in PEFT layout; the target modules are the ones that carry an adapter."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    tensors = {}
    for name, m in mods.items():
        prefix = peft_prefix(name)
        tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": target_pattern(mods), "base_model_name_or_path": base_path,
        "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapter(model: nn.Module, path: Path) -> None:
    """Attach a saved adapter (adapter_config.json + adapter_model.safetensors) to a freshly loaded model. The
    adapted modules are the ones its tensors name (text, vision or both)."""
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if rank <= 0:
        raise ValueError(f"{path}: LoRA rank must be positive, got {rank}")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    where = {peft_prefix(full): (parent, child, full)
             for parent, child, full in _candidates(model, DEFAULT_TARGETS, PARTS["both"])}
    prefixes = {k.rsplit(".lora_", 1)[0] for k in tensors}
    unexpected = sorted(p for p in prefixes if p not in where)
    if unexpected or not tensors:
        raise ValueError(f"{path}: adapter keys do not match the model "
                         f"({'unexpected ' + ', '.join(unexpected[:3]) if unexpected else 'no tensors'})")
    model.requires_grad_(False)
    with torch.no_grad():
        for prefix in sorted(prefixes):
            parent, child, full = where[prefix]
            m = LoRALinear(getattr(parent, child), rank, alpha)
            for ab in "AB":
                key = f"{prefix}.lora_{ab}.weight"
                if key not in tensors:
                    raise ValueError(f"{path}: {key} is missing")
                t, param = tensors[key], getattr(m, f"lora_{ab}")
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{path}: lora_{ab} of {full} has shape {list(t.shape)}, "
                                     f"expected {list(param.shape)}")
                param.copy_(t)
            setattr(parent, child, m)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and remove the wrappers (the model is a plain model again)."""
    for name, m in list(lora_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            m.base.weight.copy_(m.merged_weight())
        setattr(parent, child, m.base)
