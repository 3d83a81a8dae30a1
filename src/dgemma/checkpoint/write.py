"""Writing checkpoints: atomically staged directories, and random checkpoints in the save_pretrained layout
(loadable by dgemma and by the reference implementation alike). The quantizer's output is written by
dgemma.checkpoint.quantize through the same staging."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ModelConfig, generation_config_dict
from ..hardware import resolve_dtype
from ..presets import config_dict, random_state_dict
from ..tokenizer import build_byte_tokenizer, save_tokenizer


def write_checkpoint(
    out: str | Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    generation: dict[str, Any] | None = None,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically (`staged_dir`): a failure never leaves a half-written checkpoint."""
    with staged_dir(out, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation or generation_config_dict(), indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it gets ordinary permissions and is renamed into
    place (replacing `out` when `overwrite`), on any error it is removed. Nothing half-written is ever at `out`."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the directory ordinary permissions
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --force to replace it)")


def write_random_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32",
                            std: float = 0.02, overwrite: bool = False, config: dict[str, Any] | None = None,
                            **overrides: Any) -> Path:
    """A random DiffusionGemma checkpoint with the byte-level tokenizer (vocab must hold it). `config`: a
    config.json to use as it is (e.g. one the reference saved) instead of the preset's."""
    check_target(Path(out), overwrite)  # before building any weights
    tok = build_byte_tokenizer()
    cfg_dict = config if config is not None else config_dict(preset, dtype=dtype, **overrides)
    cfg = ModelConfig.from_dict(cfg_dict)
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size must be >= {tok.vocab_size} to hold the byte-level tokenizer")
    state = random_state_dict(cfg, seed=seed, std=std, dtype=resolve_dtype(dtype))
    return write_checkpoint(out, cfg_dict, state, generation_config_dict(), tok, overwrite=overwrite)
