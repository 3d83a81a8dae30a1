"""KV cache written by the encoder (prefill / commit) and read, never written, by the decoder (denoise).

Sliding layers keep only the last `sliding_window - 1` positions: that is all a later query can see, and it is
exactly what the reference's dynamic cache keeps, so the decoder's sliding layers see the same keys.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int):
        self.config = config
        self.batch_size = batch_size
        self.length = 0  # positions written so far (the next token's position)
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        # Per layer, the number of positions to keep (None = all).
        self.keep = [config.sliding_window - 1 if s.sliding else None for s in config.layers]

    def stored(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def _concat(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is None:
            return k, v
        return torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder: append new [B, Hkv, L, D] states; return cached + new for attention."""
        full_k, full_v = self._concat(layer, k, v)
        keep = self.keep[layer]
        if keep is not None and full_k.shape[2] > keep:
            self.keys[layer] = full_k[:, :, full_k.shape[2] - keep:] if keep > 0 else full_k[:, :, :0]
            self.values[layer] = full_v[:, :, full_v.shape[2] - keep:] if keep > 0 else full_v[:, :, :0]
        else:
            self.keys[layer], self.values[layer] = full_k, full_v
        return full_k, full_v

    def read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder: cached + canvas states, leaving the cache untouched."""
        return self._concat(layer, k, v)

    def advance(self, n: int) -> None:
        self.length += n
