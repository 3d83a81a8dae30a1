"""The vision tower's time per image at the real shapes, batched over images.

Real Gemma 4 / DiffusionGemma tower: d 1152, 27 layers, 16 heads x 72, MLP 4304, patch 16; at the default budget of
280 soft tokens an image is 2520 patches (a 960 x 672 image fills it exactly; smaller ones are padded to it, and the
padding is computed too). Random weights (speed does not depend on them). For each batch size it times the image
processor (decode-free: PIL images in memory) and the tower + projector (`VisionEncoder`), reports seconds per
image and the tower's GFLOP/s (matmuls and attention, counted below), and writes the results with the CPU model.

    OMP_NUM_THREADS=2 python benchmarks/vision_tower.py --images 1,2 --dtypes float32,bfloat16 \
        --json-out benchmarks/results/vision_tower_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from dgemma import hardware
from dgemma.images import ImageProcessorConfig, preprocess_images
from dgemma.vision import VisionConfig, VisionEncoder

TEXT_HIDDEN = 2816  # the 26B-A4B text width (the projector's output)


def tower_flops(cfg: VisionConfig, patches: int) -> float:
    """Multiply-adds x 2 of one image: q/k/v/o, the gated MLP, attention scores and values, patch embedding and
    the projector (on the pooled tokens)."""
    d, h, hd, kv, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads, \
        cfg.intermediate_size
    per_layer = patches * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter) + 2 * h * patches ** 2 * hd
    embed = patches * 3 * cfg.patch_size ** 2 * d
    proj = patches // cfg.pooling_kernel_size ** 2 * d * TEXT_HIDDEN
    return 2.0 * (cfg.num_hidden_layers * per_layer + embed + proj)


def random_encoder(cfg: VisionConfig, dtype: torch.dtype, seed: int) -> VisionEncoder:
    enc = VisionEncoder(cfg, TEXT_HIDDEN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    return enc.to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="1,2", help="batch sizes (images per tower call), comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--max-soft-tokens", type=int, default=280)
    ap.add_argument("--layers", type=int, default=27, help="encoder layers (27 = the real tower)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per batch size after one warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VisionConfig(num_hidden_layers=args.layers)
    proc = ImageProcessorConfig(max_soft_tokens=args.max_soft_tokens)
    # An image that fills the budget exactly: (H/16) * (W/16) = max_soft_tokens * 9 patches, sides multiples of 48.
    rng = np.random.default_rng(0)
    info = hardware.describe()
    print(f"# {info['cpu']} threads={torch.get_num_threads()} torch {info['torch']} device={args.device}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        enc = random_encoder(cfg, dtype, 0).to(args.device)
        n_params = sum(p.numel() for p in enc.parameters())
        for n in (int(x) for x in args.images.split(",")):
            imgs = [Image.fromarray(rng.integers(0, 256, (672, 960, 3), dtype=np.uint8)) for _ in range(n)]
            t = time.perf_counter()
            batch = preprocess_images(imgs, config=proc)
            prep_s = time.perf_counter() - t
            pv = batch["pixel_values"].to(args.device, dtype)
            pos = batch["image_position_ids"].to(args.device)
            patches = pv.shape[1]

            def call():
                with torch.inference_mode():
                    out, counts = enc(pv, pos)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                return out, counts

            t = time.perf_counter()
            out, counts = call()  # warm-up (also timed: the first call is what a single request pays)
            first_s = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                call()
                times.append(time.perf_counter() - t)
            best = min(times) if times else first_s
            flops = n * tower_flops(cfg, patches)
            row = {"dtype": dtype_name, "images": n, "patches_per_image": patches, "soft_tokens": counts,
                   "tower_s": round(best, 3), "tower_s_per_image": round(best / n, 3),
                   "first_call_s": round(first_s, 3), "preprocess_s_per_image": round(prep_s / n, 4),
                   "tower_gflop_per_image": round(tower_flops(cfg, patches) / 1e9, 1),
                   "gflops": round(flops / best / 1e9, 1), "params": n_params}
            rows.append(row)
            print(f"{dtype_name:9s} {n} image(s) x {patches} patches: tower {best:.2f} s "
                  f"({best / n:.2f} s/image, {row['gflops']:.0f} GFLOP/s), preprocess {prep_s / n * 1e3:.0f} ms/image")
        enc = None  # free this dtype's weights before the next are built
    result = {"cpu": info, "threads": torch.get_num_threads(), "device": args.device, "layers": args.layers,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
              "max_soft_tokens": args.max_soft_tokens, "config": cfg.__dict__, "rows": rows,
              "command": "python benchmarks/vision_tower.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
