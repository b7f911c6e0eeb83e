"""Mixed precision (Micikevicius et al. 2018): 16-bit numbers where they are cheap, float32
where they must be exact.

A tensor core multiplies 16-bit inputs and adds the products up in float32; its result is
stored in 16 bits again. NumPy has no 16-bit matrix multiply (a float16 `@` runs in a slow
loop, and bfloat16 does not exist in NumPy at all), so this module reproduces the *numbers*
of that arithmetic with float32 arrays: `to_grid` rounds a float32 array to the nearest value
a 16-bit format can hold, and `matmul` rounds both inputs to that grid, multiplies in float32
(NumPy's float32 BLAS accumulates in float32, as the tensor core does) and rounds the result.

    fp16 (IEEE half):  1 sign, 5 exponent, 10 mantissa bits; largest 65504, smallest
                       normal 2^-14, smallest subnormal 2^-24 - small gradients underflow to
                       0, which is why fp16 training needs loss scaling (optim.loss_scale_*).
    bf16 (bfloat16):   1 sign, 8 exponent, 7 mantissa bits: float32's range, 3 significant
                       digits - exactly the top 16 bits of a float32.

bfloat16 is written by hand here, not taken from `ml_dtypes` (the NumPy extension JAX uses):
it is the top half of a float32, so rounding to it is three integer operations on the float32
bits (`round_bf16`), which the course shows; and `ml_dtypes` has no fast matrix multiply
either, so every product would be computed in float32 anyway. `encode` stores a 16-bit array
in 2 bytes per value (float16, or the bfloat16 bits as uint16), so the training state's
2 + 2 + 4 + 4 + 4 bytes per parameter can be counted from real arrays (`state_bytes`).
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16")
FP16_MAX = 65504.0  # the largest finite float16


def require_precision(name: str, value) -> str:
    """`value` if it is one of PRECISIONS, else a ValueError naming `name`."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{name}: expected one of {list(PRECISIONS)}, got {value!r}")
    return value


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values on the bfloat16 grid, rounded to nearest, ties to even.

    Adding 0x7FFF plus the lowest kept bit to the 32 bits, then clearing the low 16, rounds the
    mantissa to 7 bits (a carry may bump the exponent: that is correct rounding, up to inf).
    NaN stays NaN (its low bits could otherwise round it to inf)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    out = rounded.view(np.float32)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.nan
    return out


def round_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> float32 values on the float16 grid (NumPy's conversion: nearest, ties to
    even; beyond 65504 it overflows to inf, below 2^-24 it underflows to 0)."""
    with np.errstate(over="ignore"):  # overflowing to inf is what fp16 does
        return np.asarray(x).astype(np.float16).astype(np.float32)


def to_grid(x: np.ndarray, precision: str) -> np.ndarray:
    """x rounded to `precision`'s grid, as float32 (fp32: x unchanged, no copy)."""
    if precision == "fp32":
        return x
    return round_bf16(x) if precision == "bf16" else round_fp16(x)


def matmul(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """a @ b as a tensor core computes it: 16-bit inputs, float32 sums, a 16-bit result
    (fp32: plain a @ b). Rounding a value already on the grid leaves it unchanged."""
    if precision == "fp32":
        return a @ b
    return to_grid(to_grid(a, precision) @ to_grid(b, precision), precision)


def encode(x: np.ndarray, precision: str) -> np.ndarray:
    """x stored in 2 bytes per value: float16 for fp16, the top 16 bits (uint16) for bf16."""
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float32).astype(np.float16)
    if precision == "bf16":
        return (round_bf16(x).view(np.uint32) >> 16).astype(np.uint16)
    raise ValueError(f"precision: expected 'bf16' or 'fp16' to store in 16 bits, "
                     f"got {precision!r}")


def decode(stored: np.ndarray, precision: str) -> np.ndarray:
    """The float32 values of an `encode`d array (exact: every 16-bit value is a float32)."""
    if precision == "fp16":
        return stored.astype(np.float32)
    return (stored.astype(np.uint32) << 16).view(np.float32)


def state_bytes(master: dict, opt_state: dict, weights16: dict, grads16: dict
                ) -> dict[str, int]:
    """Bytes of mixed-precision AdamW training state counted from the arrays themselves, in
    costmodel.training_state_bytes's parts: the 16-bit weights, the 16-bit gradients, and
    the optimizer's float32 master weights and Adam moments m and v (its "step" counter is
    not counted) - 2 + 2 + (4 + 4 + 4) bytes per parameter."""
    def total(arrays) -> int:
        return sum(int(a.nbytes) for a in arrays)

    moments = [a for k, a in opt_state.items() if k != "step"]
    return {"parameters": total(weights16.values()), "gradients": total(grads16.values()),
            "optimizer (master, m, v)": total(master.values()) + total(moments)}
