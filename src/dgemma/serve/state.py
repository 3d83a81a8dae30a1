"""What one served model's routes share: the model, its engine, limits, key and card."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constraints import CompileLimits
from ..limits import Limits
from .engine import Engine


def task_info(model_dir: Path | None) -> dict[str, Any]:
    """Optional task.json next to the weights: tells clients (and the visualizer) how to frame prompts."""
    if model_dir is None or not (model_dir / "task.json").is_file():
        return {}
    try:
        info = json.loads((model_dir / "task.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


@dataclass
class ServerState:
    model: Any
    engine: Engine
    name: str
    limits: Limits
    api_key: str | None
    task: dict[str, Any]
    created: int
    max_prompt: int  # tokens
    max_chars: int  # prompt characters, checked before tokenizing
    prep: ThreadPoolExecutor  # parsing, templates and tokenizing, off the event loop
    compile_limits: CompileLimits  # --compile-seconds / --compile-memory-mb / --compile-states

    def card(self) -> dict:
        cfg, gen = self.model.config, self.model.generation_config
        tok = self.model.tokenizer
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "dgemma",
                "dgemma": {"canvas_length": cfg.canvas_length, "vocab_size": cfg.vocab_size,
                           "max_prompt_tokens": self.max_prompt, "max_tokens": self.limits.max_tokens,
                           "max_denoising_steps": self.limits.max_denoising_steps, "max_n": self.limits.max_n,
                           "chat": tok is not None and tok.chat_template is not None,
                           "images": self.model.vision is not None,
                           "generation_config": gen.to_dict() if gen else None, **self.task}}
