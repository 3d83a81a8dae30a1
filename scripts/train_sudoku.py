"""Train the bundled Sudoku model: a small DiffusionGemma (MoE, sliding + full layers) fine-tuned from random
initialisation with dgemma's DiffusionGemma objective on generated puzzles.

    python scripts/train_sudoku.py --out runs/sudoku --steps 6000 --threads 1

Writes <out>/base (the random-init base model), <out>/train.jsonl, <out>/run (finetune output, train_log.jsonl)
and, with --bundle DIR, copies the final model plus its log and this command there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from dgemma.config import ModelConfig
from dgemma.presets import config_dict, generation_config_dict, random_state_dict, write_checkpoint
from dgemma.tasks import sudoku
from dgemma.tokenizer import build_byte_tokenizer
from dgemma.train import TrainConfig, finetune

# Small enough to train on a laptop CPU, with every DiffusionGemma feature: MoE + dense MLP, sliding and full
# layers (K-as-V, proportional RoPE), self-conditioning. The canvas holds the 81 digits and the end-of-turn token.
SUDOKU_SHAPE = dict(
    vocab_size=262, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1, num_experts=4,
    top_k_experts=2, moe_intermediate_size=128, sliding_window=256, max_position_embeddings=1024,
    layer_types=["sliding_attention", "full_attention"] * 3, canvas_length=82,
)
GENERATION = dict(max_new_tokens=82, max_denoising_steps=48, entropy_bound=0.1)


def write_base(out: Path, seed: int) -> Path:
    cfg = config_dict(SUDOKU_SHAPE)
    state = random_state_dict(ModelConfig.from_dict(cfg), seed=seed, std=0.02)
    return write_checkpoint(out, cfg, state, generation_config_dict(**GENERATION), build_byte_tokenizer(),
                            overwrite=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/sudoku")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--puzzles", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run: --device cuda --dtype bfloat16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ar-only", action="store_true", help="train the autoregressive baseline (AR loss only)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bundle", default=None, help="copy the final model, log and command here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        write_base(base, args.seed)
    data = out / "train.jsonl"
    if not data.is_file():
        t0 = time.time()
        pairs = sudoku.generate_many(args.puzzles, seed=1000 + args.seed, blanks=(30, 50))
        rows = [{"prompt": sudoku.prompt_text(p), "response": sudoku.answer_text(s)} for p, s in pairs]
        tmp = data.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(data)
        print(f"generated {len(rows)} puzzles in {time.time() - t0:.0f}s", file=sys.stderr)
    cfg = TrainConfig(base=str(base), data=str(data), out=str(out / "run"), steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, chat=False, save_every=250,
                      log_every=25, seed=args.seed, resume=args.resume, device=args.device, dtype=args.dtype,
                      diffusion_weight=0.0 if args.ar_only else 1.0)
    summary = finetune(cfg)
    print(json.dumps(summary))
    if args.bundle:
        dest = Path(args.bundle)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(out / "run" / "final", dest)
        shutil.copy(out / "run" / "train_log.jsonl", dest / "train_log.jsonl")
        (dest / "task.json").write_text(json.dumps(sudoku.task_info(), indent=2) + "\n", encoding="utf-8")
        (dest / "TRAINING.md").write_text(
            "Trained by `python scripts/train_sudoku.py " + " ".join(argv or sys.argv[1:]) + "`.\n"
            "Base: random initialisation (shape in scripts/train_sudoku.py). Data: puzzles from "
            "dgemma.tasks.sudoku.generate_many (30-50 blanks). Objective: dgemma.train (AR + diffusion, "
            "self-conditioning p=0.5). Log: train_log.jsonl.\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
