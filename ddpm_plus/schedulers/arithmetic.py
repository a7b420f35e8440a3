"""The arithmetic applied to a sample: the compute dtype and linear combinations in one new buffer.

Coefficients are python floats (one step for the whole batch) or tensors broadcastable against the sample
(one entry per batch element); both give the same numbers. The compute dtype is float32, or float64 where
an input is float64 (never lower), whatever the sample dtype.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["add_scaled_", "axpy", "compute_dtype", "full_like", "is_scalar", "lincomb"]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never lower)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def is_scalar(value) -> bool:
    """None, a number or a 0-d tensor (a 1-D tensor means one entry per batch element)."""
    return not (isinstance(value, torch.Tensor) and value.ndim > 0) and not isinstance(value, (list, tuple, np.ndarray))


def axpy(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x + a·y in one new buffer; ``a`` a python float or a tensor broadcastable against ``y``."""
    return torch.add(x, y, alpha=a) if isinstance(a, float) else torch.addcmul(x, y, a)


def add_scaled_(x: torch.Tensor, a, y: torch.Tensor) -> torch.Tensor:
    """x += a·y in place."""
    return x.add_(y, alpha=a) if isinstance(a, float) else x.addcmul_(y, a)


def lincomb(a, x: torch.Tensor, b, y: torch.Tensor) -> torch.Tensor:
    """a·x + b·y in one new buffer (coefficients python floats or broadcastable tensors)."""
    return add_scaled_(torch.mul(x, a), b, y)


def full_like(value, like: torch.Tensor) -> torch.Tensor:
    """A python float or a broadcastable tensor, as a tensor of ``like``'s shape and dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(like.dtype).expand_as(like)
    return torch.full_like(like, value)
