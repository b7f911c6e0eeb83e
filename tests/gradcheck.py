"""Finite-difference gradient checking for the tests (float64 only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(f: Callable[[np.ndarray], float], x, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar function f at x: (f(x+eps) - f(x-eps)) / 2eps.

    f is called with a float64 copy of x in which one element at a time is nudged; x itself
    is never modified. Returns an array shaped like x.
    """
    x = np.array(x, dtype=np.float64)  # private copy
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        original = x[idx]
        x[idx] = original + eps
        f_plus = float(f(x))
        x[idx] = original - eps
        f_minus = float(f(x))
        x[idx] = original
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    return grad


def rel_error(a, b) -> float:
    """Relative error ||a - b|| / (||a|| + ||b||) over whole arrays; 0.0 when both are zero.

    Whole-array norms rather than per-element ratios, so entries that are (nearly) zero,
    such as the gradient of a masked position, do not turn finite-difference noise into a
    large ratio.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)
