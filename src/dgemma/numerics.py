"""Small numerical building blocks shared by the model, the sampler and training.

`linear` is the one matmul every projection goes through. Inside `row_invariant()` it pads CPU inputs below
`MIN_ROWS` rows, because CPU GEMM kernels switch algorithm (and rounding) for small row counts: with the padding a
row's result does not depend on how many other rows share the call, so a prompt gives the same tokens alone or in a
batch (fp32). The reference does not pad, so exact-parity runs leave it off.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

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


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (identity when the config has no softcap)."""
    return torch.tanh(logits / cap) * cap if cap else logits


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * (mean(x^2) + eps)^-0.5 * w with fp32 statistics, cast back to x's dtype; the weight multiplies directly
    (Gemma 4 convention: no 1 + w). Text and vision towers share it."""
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
