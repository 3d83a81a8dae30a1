"""Train a bundled Sudoku model: a small DiffusionGemma (MoE, sliding + full layers) trained from random
initialisation with dgemma's DiffusionGemma objective on generated puzzles.

    OMP_NUM_THREADS=1 python scripts/train_sudoku.py --size 6 --out runs/sudoku6 --threads 1
    python scripts/train_sudoku.py --size 9 --out runs/sudoku9 --device cuda       # the same run on a GPU

Writes <out>/base (the random-init base model), <out>/train.jsonl, <out>/run (finetune output: train_log.jsonl,
<out>/run/last for --resume, <out>/run/final) and, with --bundle DIR, copies the final model plus its log, a
task.json and a TRAINING.md holding this command there. `--ar-only` trains the autoregressive baseline (AR loss
only, same shape and budget). `--init DIR` starts from another checkpoint of the same shape instead of random
weights (to continue a model under a new schedule). `--autocast bfloat16` keeps fp32 weights and optimizer state
and runs the matmuls in bf16 (1.1x the examples/s of fp32 for the 6x6 model on an AMD EPYC with avx512_bf16,
`benchmarks/sudoku/train_speed_epyc.json`; very slow on CPUs without bf16 instructions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dgemma.config import ModelConfig
from dgemma.hardware import cpu_model
from dgemma.presets import config_dict, random_state_dict
from dgemma.config import generation_config_dict
from dgemma.checkpoint.write import write_checkpoint
from dgemma.tasks import sudoku
from dgemma.tokenizer import build_byte_tokenizer
from dgemma.train import TrainConfig, finetune

# Small enough to train on one CPU thread, with every DiffusionGemma feature: MoE + dense MLP, sliding and full
# layers (K-as-V, proportional RoPE), self-conditioning. The canvas holds the n*n digits and the end-of-turn token.
_COMMON = dict(
    vocab_size=262, num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1, num_experts=4,
    top_k_experts=2, sliding_window=256, max_position_embeddings=1024,
)
SHAPES = {
    4: dict(_COMMON, hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16, global_head_dim=32,
            moe_intermediate_size=64, layer_types=["sliding_attention", "full_attention"] * 2, canvas_length=17),
    6: dict(_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32, global_head_dim=64,
            moe_intermediate_size=128, layer_types=["sliding_attention", "full_attention"] * 2, canvas_length=37),
    9: dict(_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=6, head_dim=32, global_head_dim=64,
            moe_intermediate_size=128, layer_types=["sliding_attention", "full_attention"] * 3, canvas_length=82),
}
GENERATION = {
    4: dict(max_new_tokens=17, max_denoising_steps=16, entropy_bound=0.1),
    # 6x6 and 9x9: the bundled models' decoding, chosen on development puzzles (docs/sudoku.md, Decoding settings)
    6: dict(max_new_tokens=37, max_denoising_steps=12, entropy_bound=0.1, t_max=1.5, t_min=0.2),
    9: dict(max_new_tokens=82, max_denoising_steps=16, entropy_bound=0.1, t_max=1.5, t_min=0.6),
}
TRAIN_SEED_BASE = 1000  # training puzzles use seeds 1000+; evaluation uses 424242 and 777


def write_base(out: Path, size: int, seed: int) -> Path:
    cfg = config_dict(SHAPES[size])
    state = random_state_dict(ModelConfig.from_dict(cfg), seed=seed, std=0.02)
    return write_checkpoint(out, cfg, state, generation_config_dict(**GENERATION[size]), build_byte_tokenizer(),
                            overwrite=True)


def write_data(path: Path, size: int, n: int, seed: int, blanks: tuple[int, int] | None = None,
               workers: int = 1) -> None:
    t0 = time.time()
    pairs = sudoku.generate_many(n, seed=TRAIN_SEED_BASE + seed, size=size, blanks=blanks, workers=workers)
    rows = [{"prompt": sudoku.prompt_text(p), "response": sudoku.answer_text(s)} for p, s in pairs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    print(f"generated {len(rows)} {size}x{size} puzzles in {time.time() - t0:.0f}s ({workers} process(es))",
          file=sys.stderr)


def _blank_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blanks takes LO,HI (two integers), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--blanks needs 0 <= LO <= HI, got {text!r}")
    return lo, hi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=9, choices=sorted(SHAPES), help="grid side (default 9)")
    ap.add_argument("--out", default=None, help="run directory (default runs/sudoku<size>)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--puzzles", type=int, default=100000)
    ap.add_argument("--ar-targets", default="response", choices=["all", "response", "none"],
                    help="what the next-token loss covers (default: the response; the givens are random)")
    ap.add_argument("--blanks", default=None, type=_blank_range,
                    help="LO,HI: blank counts of the training puzzles (default: sudoku.default_blanks(size)); "
                         "a later stage can weight the hard end, e.g. 14,24 for 6x6")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-workers", type=int, default=os.cpu_count() or 1,
                    help="processes generating the puzzles (default: all cores; the same puzzles for any count)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run: --device cuda --dtype bfloat16)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--autocast", default=None, choices=["bfloat16"],
                    help="mixed precision: fp32 weights and optimizer, bf16 matmuls "
                    "(fast on CPUs with avx512_bf16/AMX)")
    ap.add_argument("--ar-only", action="store_true", help="train the autoregressive baseline (AR loss only)")
    ap.add_argument("--init", default=None, help="start from this checkpoint instead of a random initialisation")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue <out>/run from its last snapshot")
    ap.add_argument("--bundle", default=None, help="copy the final model, log and command here")
    args = ap.parse_args(argv)
    if args.data_workers < 1:
        ap.error(f"--data-workers needs at least 1, got {args.data_workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/sudoku{args.size}")
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.init) if args.init else out / "base"
    if not args.init and not (base / "model.safetensors").is_file():
        write_base(base, args.size, args.seed)
    data = out / "train.jsonl"
    if not data.is_file():
        write_data(data, args.size, args.puzzles, args.seed, args.blanks, args.data_workers)
    cfg = TrainConfig(base=str(base), data=str(data), out=str(out / "run"), steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                      chat=False, save_every=args.save_every, log_every=10, seed=args.seed, resume=args.resume,
                      device=args.device, dtype=args.dtype, ar_targets="response" if args.ar_only else args.ar_targets,
                      diffusion_weight=0.0 if args.ar_only else 1.0)
    print(f"training {args.size}x{args.size} on {cpu_model() if args.device == 'cpu' else args.device}, "
          f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
    # No weight-cast cache: it lives until the context exits, so it would keep serving the first step's weights.
    amp = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, cache_enabled=False)
           if args.autocast else contextlib.nullcontext())
    with amp:
        summary = finetune(cfg)
    print(json.dumps(summary))
    if args.bundle:
        bundle(out, Path(args.bundle), args, argv if argv is not None else sys.argv[1:])
    return 0


def bundle(out: Path, dest: Path, args: argparse.Namespace, argv) -> None:
    """Copy <out>/run/final plus its log, task.json and a TRAINING.md that says how it was made (`args`, `argv`:
    the run's parsed and raw command line) to `dest`."""
    size = args.size
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out / "run" / "final", dest)
    shutil.copy(out / "run" / "train_log.jsonl", dest / "train_log.jsonl")
    (dest / "task.json").write_text(json.dumps(sudoku.task_info(size), indent=2) + "\n", encoding="utf-8")
    log = [json.loads(x) for x in (dest / "train_log.jsonl").read_text().splitlines() if x.strip()]
    last = log[-1] if log else {}
    blanks = args.blanks or sudoku.default_blanks(size)
    if args.ar_only:
        objective = "the next-token loss on the answer only (the autoregressive baseline)"
    elif args.ar_targets == "none":
        objective = ("the canvas cross-entropy under uniform corruption t ~ U(1e-3, 1) with self-conditioning "
                     "p = 0.5, no next-token loss")
    else:
        objective = (f"the canvas cross-entropy under uniform corruption with self-conditioning p = 0.5, plus the "
                     f"next-token loss on the {args.ar_targets}")
    start = f"the weights of `{args.init}`" if args.init else "random initialisation"
    precision = "fp32 weights and AdamW state, bf16 matmuls" if args.autocast else args.dtype
    (dest / "TRAINING.md").write_text(
        f"# The bundled {size}x{size} Sudoku model\n\n"
        f"Trained in one run by\n\n    python scripts/train_sudoku.py {' '.join(argv)}\n\n"
        f"on {cpu_model() if args.device == 'cpu' else args.device} ({torch.get_num_threads()} thread(s), torch "
        f"{torch.__version__}, {precision}): {last.get('examples', 0)} examples in "
        f"{last.get('elapsed_s', 0) / 60:.0f} minutes of training.\n\n"
        f"- Shape: `SHAPES[{size}]` in scripts/train_sudoku.py, from {start}; canvas "
        f"{SHAPES[size]['canvas_length']} (the {size * size} digits and the end-of-turn token), the byte-level "
        f"tokenizer.\n"
        f"- Data: {args.puzzles} puzzles from `dgemma.tasks.sudoku.generate_many(seed={TRAIN_SEED_BASE + args.seed}, "
        f"size={size}, blanks={blanks})`, prompt `sudoku.prompt_text` (a line naming the cells, then the puzzle), "
        f"response the solution. Evaluation puzzles come from other seeds (424242, 777).\n"
        f"- Objective: `dgemma.train`: {objective}; AdamW, {args.warmup} warmup steps to lr {args.lr:g}, cosine to "
        f"{args.lr * args.min_lr_ratio:g}, gradient clipping 1.0, batch {args.batch_size}.\n"
        f"- Decoding: `generation_config.json`. Log: `train_log.jsonl`. `task.json` tells `dgemma sudoku` and "
        f"`dgemma serve` the grid and prompt.\n",
        encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
