"""`dgemma bench --vision` (and benchmarks/vision_tower.py): the vision tower's time per image at the real shapes,
batched over images.

The real Gemma 4 / DiffusionGemma tower: d 1152, 27 layers, 16 heads x 72, MLP 4304, patch 16. At the default budget
of 280 soft tokens an image is 2520 patches (a 960 x 672 image fills it exactly; smaller ones are padded to it, and
the padding is computed too). Random weights (speed does not depend on them). For each batch size: the image
processor's time (PIL images in memory) and the tower + projector's (`VisionEncoder`), seconds per image and the
tower's GFLOP/s (matmuls and attention, counted below), with the CPU model and the load average.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from PIL import Image

from ..hardware import describe
from ..images import ImageProcessorConfig, preprocess_images
from ..vision import VisionConfig, VisionEncoder

TEXT_HIDDEN = 2816  # the 26B-A4B text width (the projector's output)


def tower_flops(cfg: VisionConfig, patches: int) -> float:
    """2 x multiply-adds of one image: q/k/v/o, the gated MLP, attention scores and values, the patch embedding and
    the projector (on the pooled tokens)."""
    d, h, hd, kv, inter = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads,
                           cfg.intermediate_size)
    per_layer = patches * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter) + 2 * h * patches ** 2 * hd
    embed = patches * 3 * cfg.patch_size ** 2 * d
    proj = patches // cfg.pooling_kernel_size ** 2 * d * TEXT_HIDDEN
    return 2.0 * (cfg.num_hidden_layers * per_layer + embed + proj)


def random_encoder(cfg: VisionConfig, dtype: torch.dtype, seed: int = 0) -> VisionEncoder:
    enc = VisionEncoder(cfg, TEXT_HIDDEN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    return enc.to(dtype).eval()


def run(images: list[int], dtypes: list[str], max_soft_tokens: int = 280, layers: int = 27, repeats: int = 1,
        device: str = "cpu", log=print) -> dict:
    """Time the tower for each dtype and batch size: one warm-up call (timed too: what a lone request pays), then
    `repeats` timed calls, the best counting."""
    cfg = VisionConfig(num_hidden_layers=layers)
    proc = ImageProcessorConfig(max_soft_tokens=max_soft_tokens)
    rng = np.random.default_rng(0)
    # An image that fills the budget exactly (no padding): (H/48) x (W/48) = max_soft_tokens, near square
    # (672 x 960 at 280).
    rows_, cols = max((a, max_soft_tokens // a) for a in range(1, int(max_soft_tokens ** 0.5) + 1)
                      if max_soft_tokens % a == 0)
    side = proc.pooling_kernel_size * proc.patch_size
    height, width = rows_ * side, cols * side
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        enc = random_encoder(cfg, dtype).to(device)
        n_params = sum(p.numel() for p in enc.parameters())
        for n in images:
            imgs = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]
            t = time.perf_counter()
            batch = preprocess_images(imgs, config=proc)
            prep_s = time.perf_counter() - t
            pv, pos = batch["pixel_values"].to(device, dtype), batch["image_position_ids"].to(device)
            times = []
            for _ in range(1 + repeats):
                t = time.perf_counter()
                with torch.inference_mode():
                    _, counts = enc(pv, pos)
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            best = min(times[1:]) if repeats else times[0]
            flops = tower_flops(cfg, pv.shape[1])
            row = {"dtype": dtype_name, "images": n, "patches_per_image": pv.shape[1], "soft_tokens": counts,
                   "tower_s": round(best, 3), "tower_s_per_image": round(best / n, 3),
                   "first_call_s": round(times[0], 3), "preprocess_s_per_image": round(prep_s / n, 4),
                   "tower_gflop_per_image": round(flops / 1e9, 1), "gflops": round(n * flops / best / 1e9, 1),
                   "params": n_params}
            rows.append(row)
            log(f"{dtype_name:9s} {n} image(s) x {pv.shape[1]} patches: tower {best:.2f} s ({best / n:.2f} s/image, "
                f"{row['gflops']:.0f} GFLOP/s), preprocess {prep_s / n * 1e3:.0f} ms/image")
        enc = None  # free this dtype's weights before the next are built
    return {"cpu": describe(), "threads": torch.get_num_threads(), "device": device, "layers": layers,
            "max_soft_tokens": max_soft_tokens, "repeats": repeats, "config": cfg.__dict__, "rows": rows,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def cli_run(args) -> int:
    """`dgemma bench --vision`: one line per dtype and batch size; the result as JSON to --json-out."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = describe()
    print(f"# {info['cpu']} threads={torch.get_num_threads()} torch {info['torch']} device={args.device}")
    result = run([int(x) for x in args.images.split(",") if x], [d for d in args.dtypes.split(",") if d],
                 max_soft_tokens=getattr(args, "max_soft_tokens", 280), layers=getattr(args, "layers", 27),
                 repeats=args.repeats, device=args.device)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0
