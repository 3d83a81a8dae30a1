"""Average the weights of a run's last snapshots (checkpoint averaging): the mean of K late snapshots of one run
sits nearer the centre of the basin the optimizer is circling than any one of them, which smooths the
snapshot-to-snapshot noise of a small model trained at a non-zero learning rate.

    python scripts/average_checkpoints.py OUT runs/sudoku6/ckpts/step-6000 runs/sudoku6/ckpts/step-6250 ...

Every input must have the same tensors and shapes; OUT gets the first input's other files (config, tokenizer,
generation config) and is written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from dgemma.checkpoint.write import staged_dir


def average(srcs: list[Path]) -> dict:
    states = [load_file(str(p / "model.safetensors")) for p in srcs]
    first = states[0]
    for p, s in zip(srcs[1:], states[1:]):
        if s.keys() != first.keys() or any(s[k].shape != first[k].shape for k in first):
            raise SystemExit(f"{p}: tensors differ from {srcs[0]}'s")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(first[k].dtype) for k in first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    srcs = [Path(p) for p in args.checkpoints]
    state = average(srcs)
    with staged_dir(args.out, overwrite=args.force) as tmp:
        for f in srcs[0].iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, tmp / f.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    print(f"averaged {len(srcs)} checkpoints into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
