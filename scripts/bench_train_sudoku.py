"""Training throughput (examples/s) of the Sudoku recipes on this machine: the first bundled model's recipe against
the current one, measured in the same run in alternating rounds (so a busy machine slows both alike).

    OMP_NUM_THREADS=1 python scripts/bench_train_sudoku.py --threads 1 --rounds 3 \
        --out benchmarks/sudoku/train_speed.json

Recipes (random initialisation, full optimizer steps: losses, backward, clipping, AdamW):
- `before`: 9x9, prompt = instruction + cell names + puzzle (287 tokens with the answer), batch 32, next-token loss
  on prompt and answer, the row-invariant GEMM padding the trainer used to switch on (padded expert matmuls);
- `9x9`: prompt = cell names + puzzle, batch 64, next-token loss on the answer only (`ar_targets="response"`);
- `9x9-diffusion-only`: the same without the next-token loss (`ar_targets="none"`: the encoder covers the prompt);
- `6x6`: the bundled 6x6 recipe's first stage (`ar_targets="none"`, batch 32);
- `6x6-batch64`, `6x6-batch64-bf16`: its second stage's batch, in fp32 and with bf16 matmuls (`--autocast bfloat16`:
  fp32 weights; fast on CPUs with avx512_bf16 or AMX, very slow on CPUs without).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_sudoku as T  # noqa: E402

from dgemma.checkpoint.load import load_model  # noqa: E402
from dgemma.numerics import row_invariant  # noqa: E402
from dgemma.tasks import sudoku  # noqa: E402
from dgemma.train import Example, TrainConfig, collate, losses  # noqa: E402

RECIPES = {  # name: (size, legacy prompt, batch, ar_targets, row_invariant, bf16 autocast)
    "before": (9, True, 32, "all", True, False),
    "9x9": (9, False, 64, "response", False, False),
    "9x9-diffusion-only": (9, False, 64, "none", False, False),
    "9x9-diffusion-only-bf16": (9, False, 64, "none", False, True),
    "6x6": (6, False, 32, "none", False, False),
    "6x6-batch64": (6, False, 64, "none", False, False),
    "6x6-batch64-bf16": (6, False, 64, "none", False, True),
}


class Recipe:
    def __init__(self, name: str, tmp: Path):
        size, legacy, self.batch, targets, self.row_invariant, self.bf16 = RECIPES[name]
        base = T.write_base(tmp / name, size, 0)
        pipe = load_model(base)
        self.model = pipe.module
        self.model.requires_grad_(True)
        self.model.train()
        tok = pipe.tokenizer
        pairs = sudoku.generate_many(self.batch, seed=5, size=size)
        prompt = sudoku.legacy_prompt_text if legacy else sudoku.prompt_text
        end = pipe.generation_config.eos_ids[0]
        self.examples = [Example(tok.encode(prompt(p)), tok.encode(s) + [end]) for p, s in pairs]
        self.cfg = TrainConfig(base="", data="", out="", ar_targets=targets)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=self.cfg.betas)
        self.gen = torch.Generator().manual_seed(0)
        self.tokens = len(self.examples[0].prompt) + len(self.examples[0].response)

    def step(self) -> None:
        ids, pads, p_len, r_len = collate(self.examples, 0, "cpu")
        amp = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if self.bf16
               else contextlib.nullcontext())
        with row_invariant(self.row_invariant) if self.row_invariant else contextlib.nullcontext(), amp:
            ar, diff = losses(self.model, ids, pads, p_len, r_len, self.cfg, self.gen)
            loss = self.cfg.ar_weight * ar + self.cfg.diffusion_weight * diff
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per recipe per round")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.recipes.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        recipes = {n: Recipe(n, Path(tmp)) for n in names}
        for r in recipes.values():
            r.step()  # warm-up
        seconds = {n: 0.0 for n in names}
        for _ in range(args.rounds):
            for n, r in recipes.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    r.step()
                seconds[n] += time.perf_counter() - t0
    rows = {}
    for n, r in recipes.items():
        eps = args.rounds * args.steps * r.batch / seconds[n]
        rows[n] = {"examples_per_s": eps, "batch": r.batch, "tokens_per_example": r.tokens,
                   "ar_targets": r.cfg.ar_targets}
    ref = rows.get("before", {}).get("examples_per_s")
    result = {"cpu": T.cpu_model(), "threads": args.threads, "torch": torch.__version__, "recipes": rows}
    for n, row in rows.items():
        if ref:
            row["vs_before"] = row["examples_per_s"] / ref
        print(f"{n:20s} {row['examples_per_s']:7.2f} examples/s  ({row['tokens_per_example']} tokens, batch "
              f"{row['batch']})" + (f"  {row['vs_before']:.2f}x" if ref else ""))
    print(f"{result['cpu']}, {args.threads} thread(s), torch {torch.__version__}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
