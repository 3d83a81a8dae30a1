"""KV cache written by the encoder (prefill / commit) and read, never written, by the decoder (denoise).

Each layer owns one preallocated buffer [B, Hkv, capacity, D]. Slots [0, n) hold cached states; the decoder puts
the canvas's K/V in the scratch slots [n, n + C) and attends over [0, n + C), so no step allocates or concatenates.
Sliding layers keep only the last `sliding_window - 1` positions: all a later query can see, and exactly what the
reference's dynamic cache keeps, so the decoder's sliding layers see the same keys.

Batches of prompts with different lengths are left-padded: row b's position of slot s is s - pad[b], and slots
before pad[b] are never attended to (attention then runs per row over exactly the row's own keys).

For prefix caching (prefix_cache.py) a cache can also record what sliding layers write before their window drops
it (`recording`), be set to the state an encode of a prefix leaves (`load_prefix`), and assemble a padded batch
from batch-1 caches (`place_row`).
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .numerics import put_rows


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
        self.max_tokens = max_tokens
        self.length = 0  # slots written so far (absolute slot index of the next token)
        # layer -> states each encoder pass wrote, in pass order (see `recording`); None: not recording
        self.recorded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        scratch = config.canvas_length if scratch is None else scratch
        self.scratch = scratch
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
        if self.recorded is not None and self.keep[layer] is not None:
            self.recorded.setdefault(layer, []).append((k, v))  # fresh tensors: kept as they are, not copied
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

    def read(self, layer: int, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decoder: cached + canvas states (the canvas in scratch slots; cached slots are not modified), and the
        absolute slot of the first returned key. `slots` [B, A] (step cache): `k`/`v` are those canvas positions
        only; the canvas's other scratch slots keep the states an earlier pass left there."""
        n = self.count[layer]
        buf_k, buf_v = self.k[layer], self.v[layer]
        if slots is None:
            length = k.shape[2]
            buf_k[:, :, n:n + length] = k
            buf_v[:, :, n:n + length] = v
        else:
            length = self.scratch
            put_rows(buf_k, slots + n, k, dim=2)
            put_rows(buf_v, slots + n, v, dim=2)
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

    # -- prefix caching -------------------------------------------------------------------------------------------
    def recording(self, on: bool) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Start (on) or stop recording the states sliding layers write (full layers keep every state in their
        buffer anyway). Returns what was recorded when stopping: layer -> one (k, v) [B, Hkv, L, D] per pass."""
        recorded, self.recorded = self.recorded, ({} if on else None)
        return recorded

    def load_prefix(self, pieces: list[list[tuple[torch.Tensor, torch.Tensor]]], length: int) -> None:
        """Set an empty batch-1 cache to the state encoding `length` positions leaves. pieces[layer]: consecutive
        (k, v) [Hkv, n, D] states ending at position `length`: every position for full layers, at least the
        window for sliding layers (earlier ones are skipped, as `advance` drops them)."""
        if self.batch_size != 1 or self.length != 0:
            raise ValueError("load_prefix fills an empty batch-1 cache")
        for layer, keep in enumerate(self.keep):
            n = length if keep is None else min(length, keep)
            pos = length - sum(k.shape[1] for k, _ in pieces[layer])  # position of the first piece's first state
            first = length - n  # the first position the layer keeps (buffer slot 0)
            if pos > first:
                raise ValueError(f"layer {layer} needs positions from {first}, the pieces start at {pos}")
            for k, v in pieces[layer]:
                lo, hi = max(pos, first), pos + k.shape[1]
                if lo < hi:
                    self.k[layer][0, :, lo - first:hi - first] = k[:, lo - pos:]
                    self.v[layer][0, :, lo - first:hi - first] = v[:, lo - pos:]
                pos = hi
            self.start[layer], self.count[layer] = first, n
        self.length = length

    def place_row(self, b: int, row: KVCache) -> None:
        """Fill row b of this left-padded batch cache from an encoded batch-1 cache of that row alone (its
        positions shifted right by the row's padding): with every row placed, the cache is in the state a batched
        encode leaves, each row with the row's own states. Padding slots hold zeros (attention never reads them)."""
        pad = self.pad_list[b] if self.pad_list is not None else 0
        width = row.length + pad
        if self.length not in (0, width):
            raise ValueError(f"row {b} ends at slot {width}, the rows placed before end at {self.length}")
        for layer, keep in enumerate(self.keep):
            n = width if keep is None else min(width, keep)  # a batched encode keeps slots [width - n, width)
            have = row.count[layer]  # min(row length, window) <= n: the row's states fill the last slots
            self.k[layer][b, :, :n - have].zero_()
            self.v[layer][b, :, :n - have].zero_()
            self.k[layer][b, :, n - have:n] = row.k[layer][0, :, :have]
            self.v[layer][b, :, n - have:n] = row.v[layer][0, :, :have]
            self.start[layer], self.count[layer] = width - n, n
        self.length = width

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

    def read(self, layer, k, v, slots=None):
        if slots is not None:
            raise ValueError("the training cache has no canvas scratch: step_cache passes are for generation")
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
