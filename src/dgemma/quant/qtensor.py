"""QTensor: a weight kept in its low-bit layout, dequantized or multiplied on demand.

A QTensor has a logical shape [out, in] (a linear layer) or [E, out, in] (the fused experts of one layer: gate+up
as rows [:I] gate, [I:] up, like the model's `gate_up_proj [E, 2I, H]`; down `[E, H, I]`). It never holds the dense
weight: `dequantize` builds it (one expert at a time when `index` is given) by the format's own formula, and
`linear` multiplies by it. Subclasses are dataclasses whose tensor fields are the packed data; they register
themselves by scheme name so loaders and writers can find them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, TypeVar

import torch

from ..numerics import linear as dense_linear


class QuantError(ValueError):
    """A quantized tensor or layout is inconsistent; the message names the file/tensor at fault."""


MODE = {"kernel": "auto"}  # "auto" (measured choice) or "dequant" (expand + the model's matmul: exact vs dequantize)
_SCHEMES: dict[str, type["QTensor"]] = {}
Q = TypeVar("Q", bound=type["QTensor"])


def register(*names: str) -> Callable[[Q], Q]:
    """Class decorator: make a QTensor subclass findable by its scheme name(s). A name ending in "-*" covers a
    family ("gguf-*" matches "gguf-Q4_K")."""

    def wrap(cls: Q) -> Q:
        cls.__repr__ = QTensor.__repr__  # a dataclass repr would print the packed data
        for name in names:
            if name in _SCHEMES and _SCHEMES[name] is not cls:
                raise ValueError(f"quant scheme {name!r} is registered twice "
                                 f"({_SCHEMES[name].__name__}, {cls.__name__})")
            _SCHEMES[name] = cls
        return cls

    return wrap


def scheme_class(scheme: str) -> type["QTensor"]:
    """The QTensor subclass for a scheme name (exact name first, then its "family-*" entry)."""
    if scheme in _SCHEMES:
        return _SCHEMES[scheme]
    family = scheme.split("-", 1)[0] + "-*"
    if family in _SCHEMES:
        return _SCHEMES[family]
    raise KeyError(f"unknown quant scheme {scheme!r}; known: {', '.join(sorted(_SCHEMES))}")


def schemes() -> list[str]:
    return sorted(_SCHEMES)


class QTensor(abc.ABC):
    """Base class. Subclasses are dataclasses with at least the fields `scheme` and `shape`; every torch.Tensor
    field is packed data (counted by `nbytes`, moved by `to`)."""

    scheme: str
    shape: tuple[int, ...]

    # --- what a subclass implements -------------------------------------------------------------------------
    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        """The dense weight [out, in] (or expert `index` of a fused [E, out, in] tensor; the whole [E, out, in]
        when index is None) by the format's own formula, in `dtype`."""

    # --- defaults a subclass may override with real low-bit kernels ----------------------------------------
    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [..., in] @ W.T in x.dtype (W = expert `index` for fused experts). Dense fallback: dequantize the one
        matrix needed, then the model's own matmul (so row-invariant padding applies as for dense weights)."""
        if self.is_fused and index is None:
            raise ValueError(f"{self.scheme} QTensor of shape {list(self.shape)} holds experts: pass index=")
        return dense_linear(x, self.dequantize(x.dtype, index))

    # --- generic helpers ------------------------------------------------------------------------------------
    @property
    def is_fused(self) -> bool:
        """True for a fused [E, out, in] experts tensor."""
        return len(self.shape) == 3

    @property
    def num_experts(self) -> int | None:
        return self.shape[0] if self.is_fused else None

    @property
    def out_features(self) -> int:
        return self.shape[-2]

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed data: every torch.Tensor field, by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the packed data, scales included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.numel)

    @property
    def device(self) -> torch.device:
        ts = list(self.tensors().values())
        return ts[0].device if ts else torch.device("cpu")

    def to(self, device: str | torch.device) -> "QTensor":
        """A copy with every packed tensor on `device` (dtypes unchanged)."""
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)  # type: ignore[type-var]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scheme={self.scheme!r}, shape={list(self.shape)}, "
                f"{self.bits_per_weight:.2f} bits/weight, {self.nbytes} bytes)")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Raise QuantError when a packed tensor does not have the shape its scheme requires."""
    if tuple(t.shape) != tuple(shape):
        raise QuantError(f"{what}: shape {list(t.shape)}, expected {list(shape)}")
