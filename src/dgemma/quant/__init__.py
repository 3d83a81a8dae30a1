"""Quantized weights: QTensor (a weight kept in a low-bit layout), the published on-disk layouts and the modules
that compute from them without expanding the model."""

from .qtensor import QTensor, QuantError, check_shape, register, scheme_class, schemes

__all__ = ["QTensor", "QuantError", "check_shape", "register", "scheme_class", "schemes"]
