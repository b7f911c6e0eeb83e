"""Small input checks shared by every chapter.

Each helper raises a `ValueError` whose message starts with the argument's name and says
what was expected and what was found, e.g. "k: expected last dim 16 (d_k of q), got shape
(2, 5, 8)". Helpers that convert their input return the converted value.
"""

from __future__ import annotations

import numbers

import numpy as np


def _why(reason: str | None) -> str:
    return f" ({reason})" if reason else ""


def as_float_array(name: str, x, allow_neg_inf: bool = False) -> np.ndarray:
    """Return `x` as a floating-point ndarray.

    Floating arrays keep their dtype (float32 stays float32); integer and bool input becomes
    float64. Non-numeric, complex, NaN or infinite input raises; with `allow_neg_inf=True`
    entries equal to -inf are accepted (masked logits).
    """
    try:
        arr = np.asanyarray(x)  # keeps ndarray subclasses (costmodel.FlopCounter counts matmuls)
    except (TypeError, ValueError) as err:  # e.g. ragged nested lists
        message = f"{name}: expected a numeric array, got {type(x).__name__} ({err})"
        raise ValueError(message) from None
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr)
    if allow_neg_inf:
        bad &= ~np.isneginf(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "finite values or -inf" if allow_neg_inf else "finite values"
        raise ValueError(f"{name}: expected {allowed}, got {arr[first]} at index {first}")
    return arr


def as_float_dtype(name: str, dtype) -> np.dtype:
    """Return `dtype` as a NumPy floating dtype (e.g. np.float32), rejecting anything else."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"{name}: expected a floating dtype, got {dtype!r}") from None
    if resolved.kind != "f":
        raise ValueError(f"{name}: expected a floating dtype such as np.float64, got {resolved}")
    return resolved


def require_positive_int(name: str, value) -> int:
    """Return `value` as an int if it is an integer >= 1 (bools and floats such as 2.0 fail)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def require_nonnegative_int(name: str, value) -> int:
    """Return `value` as an int if it is an integer >= 0, e.g. a seed or a step counter."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def require_same_keys(name: str, d, reference: dict, reference_name: str) -> dict:
    """Check that `d` is a dict with exactly the keys of `reference`, e.g. grads vs params.

    The message lists the missing and the extra keys: "grads: expected the names of params,
    got missing ['b'] and extra ['c']".
    """
    if not isinstance(d, dict):
        kind = type(d).__name__
        raise ValueError(f"{name}: expected a dict keyed like {reference_name}, got {kind}")
    missing = sorted(set(reference) - set(d), key=str)
    extra = sorted(set(d) - set(reference), key=str)
    if missing or extra:
        found = " and ".join(
            f"{label} {keys}" for label, keys in (("missing", missing), ("extra", extra)) if keys
        )
        raise ValueError(f"{name}: expected the names of {reference_name}, got {found}")
    return d


def require_real(name: str, value, positive: bool = False) -> float:
    """Return `value` as a float if it is a finite real number (and > 0 when `positive`)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite real number"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return float(value)


def require_nonnegative_real(name: str, value) -> float:
    """Return `value` as a float if it is a finite real number >= 0, e.g. a size in bytes or a
    latency in seconds."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0:
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
    return float(value)


def require_divisible(name: str, value: int, divisor_name: str | None, divisor: int) -> None:
    """Check that `divisor` divides `value`, e.g. that n_heads divides d_model.

    `divisor_name` names where the divisor comes from; pass None for a constant such as 2.
    """
    if value % divisor != 0:
        of = f"{divisor_name}={divisor}" if divisor_name else str(divisor)
        raise ValueError(
            f"{name}: expected a multiple of {of}, got {value} ({value} % {divisor} = "
            f"{value % divisor})"
        )


def require_generator(name: str, rng) -> np.random.Generator:
    """Check that `rng` is a `np.random.Generator` (make one with np.random.default_rng(seed))."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"{name}: expected a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def require_ndim(name: str, x: np.ndarray, min_ndim: int, max_ndim: int | None = None) -> None:
    """Check that `x` has between `min_ndim` and `max_ndim` (default: no limit) dimensions."""
    if x.ndim < min_ndim or (max_ndim is not None and x.ndim > max_ndim):
        if max_ndim is None:
            wanted = f"at least {min_ndim} dims"
        elif max_ndim == min_ndim:
            wanted = f"{min_ndim} dim" + ("s" if min_ndim != 1 else "")
        else:
            wanted = f"{min_ndim} to {max_ndim} dims"
        raise ValueError(f"{name}: expected {wanted}, got shape {x.shape}")


def require_nonempty_axis(name: str, x: np.ndarray, axis: int, what: str = "entry") -> None:
    """Check that `axis` is an axis of `x` and holds at least one `what` (e.g. "key
    position"): a softmax, a maximum or a mean over an empty axis has no value."""
    if (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)
            or not -x.ndim <= axis < x.ndim):
        raise ValueError(f"axis: expected an axis of {name} (an integer in [{-x.ndim}, "
                         f"{x.ndim})), got {axis!r} for shape {x.shape}")
    if x.shape[axis] == 0:
        raise ValueError(f"{name}: expected at least one {what} along axis {axis}, got shape "
                         f"{x.shape}")


def require_dim(name: str, x: np.ndarray, axis: int, size: int, reason: str | None = None) -> None:
    """Check that axis `axis` of `x` has length `size`; `reason` says where `size` comes from."""
    if x.shape[axis] != size:
        where = "last dim" if axis == -1 else f"axis {axis} of size"
        raise ValueError(f"{name}: expected {where} {size}{_why(reason)}, got shape {x.shape}")


def require_last_dim(name: str, x: np.ndarray, size: int, reason: str | None = None) -> None:
    """Check that the last axis of `x` has length `size`; `reason` says where `size` comes from."""
    require_dim(name, x, -1, size, reason)


def require_shape(name: str, x: np.ndarray, shape: tuple, reason: str | None = None) -> None:
    """Check that `x.shape == shape`; `None` entries in `shape` match any length."""
    ok = len(x.shape) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, x.shape, strict=True)
    )
    if not ok:
        wanted = str(tuple("any" if s is None else s for s in shape)).replace("'", "")
        raise ValueError(f"{name}: expected shape {wanted}{_why(reason)}, got {x.shape}")


def require_dtype(name: str, x: np.ndarray, dtype, reason: str | None = None) -> None:
    """Check that `x` has exactly `dtype` (used to refuse silent float32 -> float64 upcasts)."""
    if x.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}{_why(reason)}, got {x.dtype}")


def as_bool_array(name: str, x) -> np.ndarray:
    """Return `x` as an ndarray if its dtype is bool; 0/1 integers or floats are rejected."""
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise ValueError(
            f"{name}: expected a bool array (True = keep), got dtype {arr.dtype}; "
            f"convert with {name}.astype(bool) if that is what you mean"
        )
    return arr


def as_int_array(name: str, x, low: int, high: int) -> np.ndarray:
    """Return `x` as an integer ndarray whose values all lie in [low, high] (inclusive)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    outside = (arr < low) | (arr > high)
    if outside.any():
        first = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(
            f"{name}: expected values in [{low}, {high}], got {arr[first]} at index {first}"
        )
    return arr


def require_broadcastable(
    name: str, x: np.ndarray, target_shape: tuple, target_desc: str | None = None
) -> None:
    """Check that `x` broadcasts to `target_shape` without enlarging it."""
    try:
        ok = np.broadcast_shapes(x.shape, target_shape) == tuple(target_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: shape {x.shape} does not broadcast to {target_shape}{_why(target_desc)}"
        )


def parse_list(flag: str, text: str, convert, check) -> list:
    """'0.003,0.01' -> [0.003, 0.01]; ValueError naming `flag` if an item does not convert
    or fails `check(flag, value)` (e.g. require_positive_int)."""
    items = []
    for item in text.split(","):
        try:
            value = convert(item.strip())
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated {convert.__name__} values, "
                             f"got {item.strip()!r} in {text!r}") from None
        items.append(check(flag, value))
    return items
