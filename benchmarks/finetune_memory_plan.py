"""The arithmetic behind the README's memory plan for fine-tuning the 26B-A4B with FSDP2 (nothing is allocated:
the model is built on the meta device and its parameters counted).

    python benchmarks/finetune_memory_plan.py [--gpus 8] [--tokens 4096] [--ce-chunk 1024] [--lora-rank 8]

Prints one JSON object: parameter counts by part, sharded state per GPU (fp32 master weights + fp32 gradients +
AdamW moments: 16 B/parameter; all-bf16: 8 B/parameter), gathered buffers, activations with and without per-layer
activation checkpointing, the logits, and the LoRA alternative. Sizes in GB (1e9 bytes).
"""

from __future__ import annotations

import argparse
import json

import torch

from dgemma.lora import apply_lora
from dgemma.model import DiffusionGemma
from dgemma.presets import preset_config

GB = 1e9


def part(name: str) -> str:
    for key, label in (("embed_tokens", "embedding"), ("experts", "experts"), ("self_attn", "attention"),
                       (".mlp.", "dense_mlp"), ("router", "router"), ("sc_", "self_conditioning")):
        if key in name:
            return label
    return "norms_and_scalars"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="prompt + response tokens of one sequence per GPU")
    ap.add_argument("--ce-chunk", type=int, default=1024, help="tokens per chunk of the AR cross-entropy")
    ap.add_argument("--lora-rank", type=int, default=8)
    args = ap.parse_args()

    cfg = preset_config(args.preset, dtype="bfloat16")
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[part(name)] = parts.get(part(name), 0) + p.numel()
    n = sum(parts.values())
    layer = max(sum(p.numel() for p in m.parameters()) for m in model.layers)
    root = n - sum(p.numel() for m in model.layers for p in m.parameters())
    h, layers, vocab, canvas = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.canvas_length
    tokens = args.tokens + canvas  # the encoder over the sequence, the decoder over one canvas

    # What backward keeps per token and layer (bf16 values): per routed expert the input copy, gate/up output,
    # activation and output; plus attention and the dense MLP (q, k, v, attention output, norms, MLP internals).
    moe = cfg.top_k_experts * (2 * h + 4 * cfg.moe_intermediate_size)
    per_layer = [2 * (moe + 6 * h + 2 * cfg.num_attention_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim
                      + 4 * cfg.intermediate_size) for s in cfg.layers]
    per_token_layer = max(per_layer)
    gathered = {"layer_bf16_with_prefetch": 2 * layer * 2 / GB, "layer_fp32_grad": layer * 4 / GB,
                "root_bf16": root * 2 / GB, "root_fp32_grad": root * 4 / GB}
    logits_per_token = vocab * 4
    activations = {
        "without_checkpointing": tokens * sum(per_layer) / GB,
        "checkpointed_layer_inputs": tokens * layers * h * 2 / GB,
        "one_layer_recompute": tokens * per_token_layer / GB,
        "ar_logits_and_grad_unchunked": 2 * args.tokens * logits_per_token / GB,
        "ar_logits_and_grad_chunked": 2 * args.ce_chunk * logits_per_token / GB,
        "canvas_logits_two_passes": 2 * canvas * logits_per_token / GB,
    }
    sharded_fp32 = 16 * n / args.gpus / GB
    total = (sharded_fp32 + sum(gathered.values()) + activations["checkpointed_layer_inputs"]
             + activations["one_layer_recompute"] + activations["ar_logits_and_grad_chunked"]
             + activations["canvas_logits_two_passes"])
    with torch.device("meta"):
        lora_model = DiffusionGemma(cfg)
    apply_lora(lora_model, args.lora_rank, 16.0)
    lora = sum(p.numel() for name, p in lora_model.named_parameters() if "lora_" in name)
    out = {
        "preset": args.preset, "gpus": args.gpus, "tokens": args.tokens, "parameters": n, "by_part": parts,
        "largest_layer": layer, "root_unit": root,
        "sharded_per_gpu_fp32_master_adamw": sharded_fp32, "sharded_per_gpu_all_bf16": 8 * n / args.gpus / GB,
        "gathered_per_gpu": gathered, "activation_bytes_per_token_layer": per_token_layer,
        "activations_per_gpu": activations, "total_per_gpu_fp32_master_checkpointed_chunked": total,
        "lora": {"rank": args.lora_rank, "trainable": lora, "trainable_state_fp32_adamw": 16 * lora / GB,
                 "frozen_base_bf16": 2 * n / GB, "frozen_base_bf16_per_gpu_fsdp": 2 * n / args.gpus / GB},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
