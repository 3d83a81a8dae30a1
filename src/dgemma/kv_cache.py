"""KV cache written by the encoder (prefill / commit) and read, never written, by the decoder (denoise).

Each layer owns one preallocated buffer [B, Hkv, capacity, D]. Slots [0, n) hold cached states; the decoder puts
the canvas's K/V in the scratch slots [n, n + C) and attends over [0, n + C), so no step allocates or concatenates.
Sliding layers keep only the last `sliding_window - 1` positions: all a later query can see, and exactly what the
reference's dynamic cache keeps, so the decoder's sliding layers see the same keys.

Batches of prompts with different lengths are left-padded: row b's position of slot s is s - pad[b], and slots
before pad[b] are never attended to (attention then runs per row over exactly the row's own keys).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_tokens: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad: torch.Tensor | None = None,
        scratch: int | None = None,
    ):
        """max_tokens: the most positions ever cached (prompt + committed canvases); scratch: canvas length."""
        self.config = config
        self.batch_size = batch_size
        self.length = 0  # slots written so far (absolute slot index of the next token)
        scratch = config.canvas_length if scratch is None else scratch
        self.keep = [config.sliding_window - 1 if s.sliding else None for s in config.layers]
        self.start = [0] * config.num_hidden_layers  # absolute slot held in buffer slot 0
        self.count = [0] * config.num_hidden_layers  # buffer slots in use
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec, keep in zip(config.layers, self.keep):
            cap = (min(keep, max_tokens) if keep is not None else max_tokens) + scratch
            shape = (batch_size, spec.num_kv_heads, cap, spec.head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
        self.pad = pad.to(device) if pad is not None and bool((pad > 0).any()) else None
        self.pad_list = pad.tolist() if self.pad is not None else None

    def stored(self, layer: int) -> int:
        return self.count[layer]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Encoder: append new [B, Hkv, L, D] states; return cached + new for attention, and the absolute slot of
        the first returned key. Sliding layers are cut back to their window in `advance`, once every layer has
        read its full states."""
        n, length = self.count[layer], k.shape[2]
        first = self.start[layer]
        buf_k, buf_v = self.k[layer], self.v[layer]
        total = n + length
        if total <= buf_k.shape[2]:
            buf_k[:, :, n:total] = k
            buf_v[:, :, n:total] = v
            self.count[layer] = total
            return buf_k[:, :, :total], buf_v[:, :, :total], first
        # A prefill longer than a sliding layer's buffer: attend over a temporary and keep only the window.
        full_k, full_v = torch.cat([buf_k[:, :, :n], k], dim=2), torch.cat([buf_v[:, :, :n], v], dim=2)
        keep = self.keep[layer]
        buf_k[:, :, :keep] = full_k[:, :, total - keep:]
        buf_v[:, :, :keep] = full_v[:, :, total - keep:]
        self.start[layer] += total - keep
        self.count[layer] = keep
        return full_k, full_v, first

    def read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decoder: cached + canvas states (the canvas in scratch slots; cached slots are not modified), and the
        absolute slot of the first returned key."""
        n, length = self.count[layer], k.shape[2]
        buf_k, buf_v = self.k[layer], self.v[layer]
        buf_k[:, :, n:n + length] = k
        buf_v[:, :, n:n + length] = v
        return buf_k[:, :, :n + length], buf_v[:, :, :n + length], self.start[layer]

    def advance(self, n: int) -> None:
        """After an encoder pass: move past the new tokens and cut sliding layers back to their window."""
        self.length += n
        for layer, keep in enumerate(self.keep):
            extra = self.count[layer] - keep if keep is not None else 0
            if extra > 0:
                self.k[layer][:, :, :keep] = self.k[layer][:, :, extra:extra + keep].clone()
                self.v[layer][:, :, :keep] = self.v[layer][:, :, extra:extra + keep].clone()
                self.start[layer] += extra
                self.count[layer] = keep

    # -- positions and masks for padded batches -------------------------------------------------------------------
    def positions(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Positions of absolute slots [start, start + length): [1, L] or, with padding, [B, L]."""
        slots = torch.arange(start, start + length, device=device)
        if self.pad is None:
            return slots[None]
        return (slots[None] - self.pad[:, None]).clamp_min(0)


class TrainingKVCache(KVCache):
    """Autograd-safe cache for fine-tuning: states are concatenated, never written in place, and nothing is
    dropped, so one causal pass over prompt + response can serve the decoder at any canvas boundary (`prefix`)."""

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype, pad: torch.Tensor | None = None):
        self.config = config
        self.batch_size = batch_size
        self.length = 0
        self.keep = [None] * config.num_hidden_layers  # keep everything; `prefix` applies the windows
        self.start = [0] * config.num_hidden_layers
        self.count = [0] * config.num_hidden_layers
        self.k = [torch.zeros(batch_size, s.num_kv_heads, 0, s.head_dim, device=device, dtype=dtype)
                  for s in config.layers]
        self.v = [t.clone() for t in self.k]
        self.pad = pad.to(device) if pad is not None and bool((pad > 0).any()) else None
        self.pad_list = pad.tolist() if self.pad is not None else None

    def write(self, layer, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        self.count[layer] = self.k[layer].shape[2]
        return self.k[layer], self.v[layer], self.start[layer]

    def read(self, layer, k, v):
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2), self.start[layer]

    def advance(self, n: int) -> None:
        self.length += n

    def prefix(self, length: int) -> TrainingKVCache:
        """What an inference cache holds after encoding the first `length` slots (sliding layers: their window)."""
        view = TrainingKVCache.__new__(TrainingKVCache)
        view.config, view.batch_size, view.length = self.config, self.batch_size, length
        view.keep, view.pad, view.pad_list = self.keep, self.pad, self.pad_list
        view.start, view.count, view.k, view.v = [], [], [], []
        for spec, k, v in zip(self.config.layers, self.k, self.v):
            first = max(0, length - (self.config.sliding_window - 1)) if spec.sliding else 0
            view.start.append(first)
            view.count.append(length - first)
            view.k.append(k[:, :, first:length])
            view.v.append(v[:, :, first:length])
        return view
