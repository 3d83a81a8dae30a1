"""Autoregressive decoding with the same weights: the causal (encoder) stack + lm_head, one token per forward pass.

The baseline that diffusion decoding is raced against: greedy (or sampled) left to right, growing the KV cache by
one token per pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .pipeline import Pipeline


@dataclass
class ARResult:
    ids: list[int]  # generated ids, up to and including EOS
    forwards: int  # forward passes after the prefill (one per generated token)
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    text: str | None = None


def _eos_set(model: Pipeline, eos_token_id) -> set[int]:
    """The call's EOS ids, else the checkpoint's generation_config ones."""
    if eos_token_id is None:
        return set(model.generation_config.eos_ids)
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


@torch.inference_mode()
def ar_stream(model: Pipeline, prompt_ids: list[int], max_new_tokens: int = 256, eos_token_id=None,
              temperature: float = 0.0, seed: int = 0):
    """Yield each new token id; greedy when temperature is 0."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens ({total}) exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")
    eos = _eos_set(model, eos_token_id)
    gen = torch.Generator().manual_seed(seed)
    cache = model.module.new_cache(1, total, scratch=1)
    ids = torch.tensor([prompt_ids], device=model.device)
    for _ in range(max_new_tokens):
        hidden = model.module.encode(ids, cache)
        logits = model.module.lm_head(hidden[:, -1])
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        else:
            nxt = int(logits.argmax(dim=-1))
        yield nxt
        if nxt in eos:
            return
        ids = torch.tensor([[nxt]], device=model.device)


def ar_generate(model: Pipeline, prompt_ids: list[int], max_new_tokens: int = 256, eos_token_id=None,
                temperature: float = 0.0, seed: int = 0) -> ARResult:
    t0 = time.perf_counter()
    out = list(ar_stream(model, prompt_ids, max_new_tokens, eos_token_id, temperature, seed))
    eos = _eos_set(model, eos_token_id)
    reason = "eos" if out and out[-1] in eos else "length"
    text = model.tokenizer.decode(out) if model.tokenizer is not None else None
    return ARResult(out, len(out), reason, {"total_s": time.perf_counter() - t0}, text)
