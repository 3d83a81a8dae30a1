"""LoRA adapters on the model's linear layers, saved with PEFT's file names and key naming, mergeable into the
base weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import Linear
from .numerics import linear
from .presets import checkpoint_key

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * x A^T B^T, with W frozen; B starts at zero so training starts from the base."""

    def __init__(self, base: Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
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
        return linear(x, self.base.weight) + linear(linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, str]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, Linear) and child_name in targets:
                full = f"{name}.{child_name}" if name else child_name
                found.append((module, child_name, full))
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=DEFAULT_TARGETS,
               generator: torch.Generator | None = None) -> list[str]:
    """Freeze the model and wrap the target linear layers; returns the wrapped module names. `generator` makes the
    adapters' initialisation reproducible."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.requires_grad_(False)
    names = []
    for parent, child_name, full in _targets(model, targets):
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha, generator))
        names.append(full)
    if not names:
        raise ValueError(f"no linear layers named {list(targets)} found")
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_prefix(name: str) -> str:
    """dgemma module name -> PEFT key prefix (base_model.model.<checkpoint module path>)."""
    return "base_model.model." + checkpoint_key(name + ".weight")[: -len(".weight")]


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
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "base_model_name_or_path": base_path,
        "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapter(model: nn.Module, path: Path) -> None:
    """Attach a saved adapter (adapter_config.json + adapter_model.safetensors) to a freshly loaded model."""
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), tuple(cfg["target_modules"]))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    mods = lora_modules(model)
    expected = {f"{peft_prefix(n)}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for name, m in mods.items():
            for ab in "AB":
                t = tensors[f"{peft_prefix(name)}.lora_{ab}.weight"]
                param = getattr(m, f"lora_{ab}")
                if tuple(t.shape) != tuple(param.shape):
                    raise ValueError(f"{path}: lora_{ab} of {name} has shape {list(t.shape)}, "
                                     f"expected {list(param.shape)}")
                param.copy_(t)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and remove the wrappers (the model is a plain model again)."""
    for name, m in list(lora_modules(model).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            m.base.weight.copy_(m.merged_weight())
        setattr(parent, child, m.base)
