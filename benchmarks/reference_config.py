"""Write the config.json that transformers (the reference, `pip install transformers==5.23.0`) saves for the real
google/diffusiongemma-26B-A4B-it configuration, for the full-size runs to build their random checkpoints on:

    python benchmarks/reference_config.py /tmp/fullsize/reference
    dgemma random-checkpoint /tmp/fullsize/nvfp4 --config /tmp/fullsize/reference/config.json --quantize nvfp4 \
        --dtype bfloat16

The text shapes are the release's (30 layers, full attention at 5, 11, 17, 23, 29 with head_dim 512 and 2 KV heads:
saved as per_layer_config {"05": ..., "29": ...}); the vision block is the reference's Gemma 4 vision default.
Only this benchmark helper imports transformers; dgemma never does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RELEASE_TEXT = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, sliding_window=1024, max_position_embeddings=262144,
    eos_token_id=[1, 106, 50], pad_token_id=0, bos_token_id=2,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to save config.json in")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    from transformers import DiffusionGemmaConfig

    cfg = DiffusionGemmaConfig(text_config=RELEASE_TEXT, vision_config={"model_type": "gemma4_vision"},
                               canvas_length=256, dtype=args.dtype)
    cfg.save_pretrained(args.out)
    saved = json.loads((Path(args.out) / "config.json").read_text())
    print(f"wrote {Path(args.out) / 'config.json'}; per_layer_config keys: "
          f"{list(saved['text_config']['per_layer_config'])}")


if __name__ == "__main__":
    main()
