"""Small numerical building blocks shared by the model, the sampler and training.

`linear` is the one matmul every projection goes through. Inside `row_invariant()` it pads CPU inputs below
`MIN_ROWS` rows, because CPU GEMM kernels switch algorithm (and rounding) for small row counts: with the padding a
row's result does not depend on how many other rows share the call, so a prompt gives the same tokens alone or in a
batch (fp32). The reference does not pad, so exact-parity runs leave it off.

The norm and the gated activation also run inside `row_invariant()` on bf16 CPU tensors in dgemma's native
extension where it is built (`dgemma.extension`): one pass per row instead of torch's passes over fp32 copies of the
whole tensor, with torch's roundings step by step; the norm's sum of squares runs in the kernel's order and the tanh
is the kernel's, so a value can differ from torch's composition in its last bf16 bit. Elsewhere (training,
exact-parity runs, fp32, other devices) torch's composition keeps the reference's bits.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from .extension import extension

MIN_ROWS = 16
ROW_INVARIANT: contextvars.ContextVar[bool] = contextvars.ContextVar("row_invariant", default=False)


@contextlib.contextmanager
def row_invariant(enabled: bool = True):
    token = ROW_INVARIANT.set(enabled)
    try:
        yield
    finally:
        ROW_INVARIANT.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T; row-count independent on CPU inside `row_invariant()`."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < MIN_ROWS and x.device.type == "cpu" and ROW_INVARIANT.get():
        out = F.linear(F.pad(flat, (0, 0, 0, MIN_ROWS - rows)), weight)[:rows]
    else:
        out = F.linear(flat, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, C, ...] -> [B, A, ...]: batch row b's entries rows[b] ([B, A]) along dim 1 (a step-cache pass's
    positions). index_select copies whole entries; a gather with an index expanded over the last dim reads an index
    per element: 6.4x slower for [1, 128 of 256, 262 144] bf16 (benchmarks/step_cache_copies.py)."""
    out = x.new_empty((x.shape[0], rows.shape[1], *x.shape[2:]))
    for b in range(x.shape[0]):
        torch.index_select(x[b], 0, rows[b], out=out[b])
    return out


def put_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, rows[b]] = values[b] along `dim` (1: [B, C, ...]; 2: a cache's [B, heads, T, D]) for every batch row
    b, in place; returns x. 11x faster than scatter_ with an index expanded over the vocabulary, 3.6x over a
    layer's K/V. A repeated position must carry the same values (as step-cache passes' padding does)."""
    for b in range(x.shape[0]):
        x[b].index_copy_(dim - 1, rows[b], values[b])
    return x


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (identity when the config has no softcap)."""
    return torch.tanh(logits / cap) * cap if cap else logits


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _fused(*tensors: torch.Tensor | None):
    """The native extension where it serves these tensors (bf16 on the CPU, inside `row_invariant()`, nothing to
    differentiate), else None."""
    if not ROW_INVARIANT.get():
        return None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or (torch.is_grad_enabled() and t.requires_grad):
            return None
    return extension() if tensors[0].dtype == torch.bfloat16 else None


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up, the gated MLPs' activation (into `out`, a [rows, I] buffer, when given)."""
    mod = _fused(gate, up, out)
    if mod is not None and up.dtype == torch.bfloat16 and gate.shape == up.shape and gate.numel() > 0:
        n = gate.shape[-1]
        g, u = gate.reshape(-1, n), up.reshape(-1, n)  # views where the rows are evenly spaced (chunk halves are)
        dst = torch.empty(gate.shape, dtype=gate.dtype) if out is None else out
        flat = dst.view(-1, n)
        if g.stride(1) == 1 and u.stride(1) == 1 and flat.stride(1) == 1:
            mod.gelu_mul(g, u, flat)
            return dst
    if out is None:
        return gelu_tanh(gate) * up
    return torch.mul(gelu_tanh(gate), up, out=out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-0.5 * w with fp32 statistics, cast back to x's dtype; the weight multiplies directly
    (Gemma 4 convention: no 1 + w). Text and vision towers share it."""
    mod = _fused(x, weight)
    if mod is not None and x.numel() > 0:
        flat = x.reshape(-1, x.shape[-1])
        w = torch.empty(0) if weight is None else weight.detach().float().contiguous()
        return mod.rms_norm(flat if flat.stride(-1) == 1 else flat.contiguous(), w, eps).view(x.shape)
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
