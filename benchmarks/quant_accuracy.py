"""What quantization costs in accuracy: every `dgemma quantize` scheme against the unquantized model.

1. Small random models built with the reference (tests/refmodels.py, transformers as the oracle): KL divergence
   (unquantized || quantized, nats per position, mean) and top-1 agreement of one denoising step's logits, over
   a few prompts and canvases per model.
2. The bundled Sudoku models (6x6 and 9x9): solve rate, blank-cell accuracy, givens kept and mean steps per canvas
   on held-out puzzles (dgemma.tasks.sudoku_run.evaluate, seed 424242), after quantization.

    OMP_NUM_THREADS=1 python benchmarks/quant_accuracy.py --n 1000 --json-out benchmarks/results/quant_accuracy.json
    # redo only the 6x6 Sudoku part, keeping the rest of an earlier run:
    OMP_NUM_THREADS=1 python benchmarks/quant_accuracy.py --n 1000 --sizes 6 --seeds "" \
        --merge benchmarks/results/quant_accuracy.json --json-out benchmarks/results/quant_accuracy.json
    python benchmarks/quant_accuracy.py --from-json benchmarks/results/quant_accuracy.json   # print the tables only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("int8", "fp8", "nvfp4", "int4")
LABELS = {"int8": "int8 per channel (dgemma)", "fp8": "FP8 per channel (compressed-tensors)",
          "nvfp4": "NVFP4 experts only (ModelOpt)", "int4": "int4 group 32 / 64 (dgemma)"}


def logit_metrics(ref: torch.Tensor, got: torch.Tensor) -> dict:
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    return {"kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
            "max_abs_diff": float((ref - got).abs().max())}


def small_models(root: Path, seeds: list[int]) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from refmodels import build

    import dgemma
    from dgemma.checkpoint.quantize import quantize_checkpoint

    out: dict = {s: [] for s in SCHEMES}
    for seed in seeds:
        _, ckpt = build(root, f"ref{seed}", canvas_length=16, seed=seed)
        base = dgemma.load_model(ckpt, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, 96, (4, 12), generator=g)
        canvas = torch.randint(3, 96, (4, 16), generator=g)
        want = base.canvas_logits(prompt, canvas)
        for scheme in SCHEMES:
            q = quantize_checkpoint(ckpt, root / f"ref{seed}-{scheme}", scheme, group=32, progress=False)
            got = dgemma.load_model(q, dtype=torch.float32).canvas_logits(prompt, canvas)
            out[scheme].append(logit_metrics(want, got))
    return {s: {"kl": sum(r["kl"] for r in rows) / len(rows), "top1": sum(r["top1"] for r in rows) / len(rows),
                "per_model": rows} for s, rows in out.items()}


def sudoku(root: Path, n: int, size: int = 9) -> dict:
    import dgemma
    from dgemma.checkpoint.quantize import quantize_checkpoint
    from dgemma.tasks.sudoku_run import BUNDLED_MODELS, evaluate

    bundled = BUNDLED_MODELS[size]
    rows = {}
    for scheme in ("none", *SCHEMES):
        path = bundled if scheme == "none" else quantize_checkpoint(bundled, root / f"sudoku{size}-{scheme}", scheme,
                                                                    group=64, progress=False)
        model = dgemma.load_model(path)
        t = time.perf_counter()
        d = evaluate(model, n=n)["default"]
        rows[scheme] = {k: d[k] for k in ("solve_rate", "cell_accuracy", "givens_kept", "mean_steps",
                                          "tokens_per_forward")}
        rows[scheme]["seconds"] = time.perf_counter() - t
        print(f"sudoku {size}x{size} {scheme}: {rows[scheme]}", file=sys.stderr, flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"Small reference-built random models ({result['small_models']['count']} seeds, 4 prompts x 16-token "
             "canvas each), one step's logits against the unquantized model:", "",
             "| scheme | KL (nats / position) | top-1 agreement |", "|---|---:|---:|"]
    for s in SCHEMES:
        r = result["small_models"][s]
        lines.append(f"| {LABELS[s]} | {r['kl']:.4f} | {r['top1']:.1%} |")
    for key, size in (("sudoku6", 6), ("sudoku", 9)):
        sd = result.get(key)
        if not sd:
            continue
        lines += ["", f"Bundled {size}x{size} Sudoku model, {result[key + '_n']} held-out puzzles (seed 424242), "
                  "default settings:", "",
                  "| weights | solved | blank cells right | givens kept | mean steps per canvas |",
                  "|---|---:|---:|---:|---:|"]
        for s in ("none", *SCHEMES):
            r = sd[s]
            name = "fp32 (unquantized)" if s == "none" else LABELS[s]
            lines.append(f"| {name} | {r['solve_rate']:.1%} | {r['cell_accuracy']:.1%} | {r['givens_kept']:.1%} | "
                         f"{r['mean_steps']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="Sudoku puzzles (0: skip the Sudoku part)")
    ap.add_argument("--sizes", default="6,9", help="bundled Sudoku models to evaluate (grid sizes)")
    ap.add_argument("--seeds", default="0,1,2", help="reference-built models (empty: skip that part)")
    ap.add_argument("--merge", help="a previous JSON whose parts this run does not redo are kept")
    ap.add_argument("--json-out")
    ap.add_argument("--from-json")
    args = ap.parse_args()
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())))
        return
    torch.manual_seed(0)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    result = json.loads(Path(args.merge).read_text()) if args.merge else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if seeds:
            result["small_models"] = {**small_models(root, seeds), "count": len(seeds)}
        for size in (int(s) for s in args.sizes.split(",") if s) if args.n else ():
            key = "sudoku" if size == 9 else f"sudoku{size}"
            result[key] = sudoku(root, args.n, size)
            result[key + "_n"] = args.n
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
