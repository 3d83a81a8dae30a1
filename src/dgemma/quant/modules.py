"""Modules that compute from QTensors: drop-ins for dgemma.model.Linear and dgemma.model.Experts.

The loader builds the model as usual and swaps these in where the checkpoint holds quantized weights; nothing
dense of the size of the model is ever materialised: each forward dequantizes (or multiplies with a low-bit kernel)
one matrix, or one expert, at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import gelu_mul
from . import native
from .qtensor import QTensor


class QLinear(nn.Module):
    """Bias-free linear layer over a QTensor [out, in] (`forward(x) = x @ W.T` in x.dtype)."""

    def __init__(self, qweight: QTensor):
        super().__init__()
        if qweight.is_fused:
            raise ValueError(f"QLinear needs a [out, in] QTensor, got shape {list(qweight.shape)}")
        self.qweight = native.adopt(qweight)

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def out_features(self) -> int:
        return self.qweight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x)

    def extra_repr(self) -> str:
        return repr(self.qweight)


class QExperts(nn.Module):
    """Packed experts over QTensors gate_up [E, 2I, H] and down [E, H, I]. Only the experts some token selected
    run, one at a time (rows grouped by expert); each token's k outputs are weighted, summed in fp32 in top-k order
    and rounded once, as in dgemma.model.Experts. Inside `row_invariant()` each expert's matmul pads small row
    counts (through dgemma.numerics.linear), so a row's result does not depend on its batch neighbours."""

    def __init__(self, gate_up: QTensor, down: QTensor):
        super().__init__()
        e, two_i, h = gate_up.shape
        if tuple(down.shape) != (e, h, two_i // 2):
            raise ValueError(f"experts: down shape {list(down.shape)} does not match gate_up {list(gate_up.shape)}")
        self.gate_up = native.adopt(gate_up)
        self.down = native.adopt(down)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n_tok, top_k = idx.shape
        flat = idx.reshape(-1)
        expert, perm = torch.sort(flat)
        counts = torch.bincount(flat, minlength=self.num_experts)
        tiled = (isinstance(self.gate_up, native.TileTensor) and isinstance(self.down, native.TileTensor)
                 and self.gate_up.runs(x))
        if tiled and x.dtype == torch.bfloat16:
            # every expert in one native call per matrix, rows grouped by expert and gathered straight into the
            # kernel's padded buffers; the weighted k-sum back in token order is one more native pass
            rows = flat.numel()
            offsets = self._offsets(counts)
            xs = native.padded_rows(rows, x.shape[-1])
            torch.index_select(x, 0, perm // top_k, out=xs[:rows])
            gate, up = self.gate_up.grouped(xs, offsets, bf16=True).chunk(2, dim=-1)
            act = native.padded_rows(rows, gate.shape[-1])
            gelu_mul(gate, up, out=act[:rows])
            return native.combine(self.down.grouped(act, offsets), perm, weights)
        xs = x.index_select(0, perm // top_k)
        if tiled:  # fp32: every expert in one call per matrix of the fp32 engine
            offsets = self._offsets(counts)
            gate, up = self.gate_up.grouped(xs, offsets).chunk(2, dim=-1)
            out = self.down.grouped(gelu_mul(gate, up), offsets)
        else:
            out = x.new_empty(xs.shape[0], x.shape[-1])
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n == 0:
                    continue
                rows = xs[start:start + n]
                gate, up = self.gate_up.linear(rows, index=e).chunk(2, dim=-1)
                out[start:start + n] = self.down.linear(gelu_mul(gate, up), index=e)
                start += n
        weighted = out.float().mul_(weights.reshape(-1).index_select(0, perm).unsqueeze(-1))
        by_token = torch.empty_like(weighted).index_copy_(0, perm, weighted)
        return by_token.view(n_tok, top_k, -1).sum(dim=1).to(x.dtype)

    def _offsets(self, counts: torch.Tensor) -> torch.Tensor:
        """int64 [E + 1]: where each expert's rows start (rows sorted by expert), then the total."""
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return offsets

    def extra_repr(self) -> str:
        return f"gate_up={self.gate_up!r}, down={self.down!r}"
