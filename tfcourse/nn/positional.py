"""Chapter 3: telling attention where each token is.

Three ways to do it:
- sinusoidal encodings (Vaswani et al. 2017), a fixed table added to the token embeddings;
- learned positional embeddings (GPT-2), a trainable table added the same way;
- rotary embeddings, RoPE (Su et al. 2021, RoFormer), which rotate queries and keys instead.

Column pairs (2i, 2i+1) share the angular frequency omega_i = base^(-2i/d), so pair i turns
by the angle pos * omega_i at position pos.
"""

from __future__ import annotations

import numpy as np

from tfcourse.nn.validate import (
    as_float_array,
    as_float_dtype,
    require_divisible,
    require_dtype,
    require_generator,
    require_ndim,
    require_nonnegative_int,
    require_positive_int,
    require_real,
    require_shape,
)


def _pair_frequencies(d: int, base: float) -> np.ndarray:
    """omega_i = base^(-2i/d) for i = 0 .. ceil(d/2) - 1 (one per column pair), float64."""
    pair_index = np.arange((d + 1) // 2)
    return 1.0 / np.power(base, 2.0 * pair_index / d)


def _check_sizes(max_len, d_model):
    return require_positive_int("max_len", max_len), require_positive_int("d_model", d_model)


# --------------------------------------------------------------------------- sinusoidal


def sinusoidal_encoding(
    max_len: int, d_model: int, base: float = 10000.0, dtype=np.float64
) -> np.ndarray:
    """Sinusoidal position table of shape (max_len, d_model).

    PE[pos, 2i] = sin(pos / base^(2i/d_model)) and PE[pos, 2i+1] = cos(pos / base^(2i/d_model)).
    Column j belongs to pair i = j // 2. For odd d_model the last column, j = d_model - 1,
    is the sine half of one more pair, i = (d_model - 1) // 2, whose cosine is dropped.
    Computed in float64, then cast to `dtype`.
    """
    max_len, d_model = _check_sizes(max_len, d_model)
    base = require_real("base", base, positive=True)
    dtype = as_float_dtype("dtype", dtype)
    angles = np.arange(max_len)[:, None] * _pair_frequencies(d_model, base)  # (max_len, pairs)
    table = np.empty((max_len, d_model))
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : d_model // 2])
    return table.astype(dtype)


def sinusoidal_wavelengths(d_model: int, base: float = 10000.0) -> np.ndarray:
    """Wavelength (in positions) of each column pair: 2*pi*base^(2i/d_model).

    Shape (ceil(d_model / 2),): one entry per pair i, so column j has wavelength
    wavelengths[j // 2] (for odd d_model the last entry is that of the lone sine column).
    They grow geometrically from 2*pi up to almost 2*pi*base.
    """
    d_model = require_positive_int("d_model", d_model)
    base = require_real("base", base, positive=True)
    return 2 * np.pi / _pair_frequencies(d_model, base)


def wrong_quoted_encoding(max_len: int, d_model: int) -> np.ndarray:
    """The WRONG formula sin(pos / 10000^2) + cos(pos / 10000^2), as (max_len, d_model).

    Some course material quotes this formula. It has no dimension index i, so every column
    holds the same value, and pos / 10^8 is so small that the value stays close to 1 for any
    realistic position: positions are neither distinguishable nor spread over frequencies.
    Kept only so the notebook can show why it fails; use `sinusoidal_encoding`.
    """
    max_len, d_model = _check_sizes(max_len, d_model)
    angle = np.arange(max_len, dtype=np.float64)[:, None] / 10000.0**2
    return np.broadcast_to(np.sin(angle) + np.cos(angle), (max_len, d_model)).copy()


def relative_shift_matrix(k: float, d_model: int, base: float = 10000.0) -> np.ndarray:
    """Block-diagonal float64 (d_model, d_model) matrix M_k with PE[pos + k] = PE[pos] @ M_k.

    Row-vector convention. Block i acts on the pair (sin a, cos a), a = pos * omega_i, and
    is [[cos b, -sin b], [sin b, cos b]] with b = k * omega_i, because
    sin(a + b) = sin a cos b + cos a sin b and cos(a + b) = cos a cos b - sin a sin b.
    M_k does not depend on pos: a shift by k is a fixed linear map. d_model must be even.
    """
    k = require_real("k", k)
    d_model = require_positive_int("d_model", d_model)
    require_divisible("d_model", d_model, None, 2)
    base = require_real("base", base, positive=True)
    b = k * _pair_frequencies(d_model, base)
    even = np.arange(0, d_model, 2)
    m = np.zeros((d_model, d_model))
    m[even, even] = np.cos(b)
    m[even, even + 1] = -np.sin(b)
    m[even + 1, even] = np.sin(b)
    m[even + 1, even + 1] = np.cos(b)
    return m


# --------------------------------------------------------------------------- learned


def init_learned_positions(max_len: int, d_model: int, rng, dtype=np.float64) -> np.ndarray:
    """Learned position table (max_len, d_model), initialised N(0, 0.02^2) as in GPT-2."""
    max_len, d_model = _check_sizes(max_len, d_model)
    rng = require_generator("rng", rng)
    dtype = as_float_dtype("dtype", dtype)
    return (0.02 * rng.standard_normal((max_len, d_model))).astype(dtype)


def learned_positions_forward(table, seq_len: int, check: bool = True, positions=0):
    """Position vectors for seq_len positions: returns (out (seq_len, d_model), cache).

    positions: an int, the first position (rows positions .. positions + seq_len - 1: the
    whole sequence from 0, or a contiguous slice of it), or a (seq_len,) array of distinct
    positions in any order (context parallelism: a rank holding a slice of every sequence, in
    zig-zag two pieces of it, embeds its own positions), or a (B, seq_len) array, each
    sequence's own (decoding a batch whose sequences hold different lengths; out is then
    (B, seq_len, d_model); check=False, and no backward: decoding has none).

    `out` broadcasts against token embeddings of shape (B, seq_len, d_model): x + out.
    It is a copy, so editing it in place cannot change the table. check=False skips the input
    checks (the GPT model's embedding, whose inputs were checked at its door).
    """
    if check:
        table = as_float_array("table", table)
        require_ndim("table", table, 2, 2)
        seq_len = require_positive_int("seq_len", seq_len)
        positions = _check_positions(positions, seq_len, table.shape[0])
    rows = _position_rows(positions, seq_len)
    cache = {"table_shape": table.shape, "dtype": table.dtype, "seq_len": seq_len,
             "rows": rows}
    return table[rows].copy(), cache


def _position_rows(positions, seq_len: int):
    """The table rows of `positions`: a slice for an int start, else the array itself."""
    if isinstance(positions, np.ndarray):
        return positions
    return slice(positions, positions + seq_len)


def _check_positions(positions, seq_len: int, max_len: int):
    if not isinstance(positions, np.ndarray):
        start = require_nonnegative_int("positions", positions)
        if start + seq_len > max_len:
            after = f" - positions {start}" if start else ""
            raise ValueError(f"seq_len: expected at most max_len={max_len}{after} (rows of "
                             f"table), got {seq_len}")
        return start
    if (positions.shape != (seq_len,) or not np.issubdtype(positions.dtype, np.integer)
            or len(np.unique(positions)) != seq_len):
        raise ValueError(f"positions: expected {seq_len} distinct integer positions (one per "
                         f"token), got an array of shape {positions.shape} and dtype "
                         f"{positions.dtype}")
    if seq_len and (positions.min() < 0 or positions.max() >= max_len):
        raise ValueError(f"positions: expected positions in [0, max_len={max_len}) (rows of "
                         f"table), got {positions.min()} .. {positions.max()}")
    return positions


def learned_positions_backward(dout, cache, check: bool = True) -> np.ndarray:
    """Gradient of the table, given dout (B, seq_len, d_model) (or (seq_len, d_model)).

    The row of each position t's slot gets dout[:, t] summed over the batch; the others get
    zero (the positions are distinct, so no row gets two).
    """
    seq_len, (_, d_model) = cache["seq_len"], cache["table_shape"]
    if check:
        dout = as_float_array("dout", dout)
        require_ndim("dout", dout, 2, 3)
        require_shape("dout", dout, dout.shape[:-2] + (seq_len, d_model),
                      "(B, seq_len, d_model)")
        require_dtype("dout", dout, cache["dtype"], "dtype of the table")
    dtable = np.zeros(cache["table_shape"], dtype=cache["dtype"])
    dtable[cache["rows"]] = dout.reshape(-1, seq_len, d_model).sum(axis=0)
    return dtable


# --------------------------------------------------------------------------- RoPE


def rope_angles(seq_len: int, d_head: int, base: float = 10000.0):
    """cos and sin of the RoPE angles m * theta_i, each of shape (seq_len, d_head // 2).

    theta_i = base^(-2i/d_head) for pair i; m is the position. d_head must be even.
    Returned in float64; `apply_rope` casts them to the dtype of x.
    """
    seq_len = require_positive_int("seq_len", seq_len)
    d_head = require_positive_int("d_head", d_head)
    require_divisible("d_head", d_head, None, 2)
    base = require_real("base", base, positive=True)
    angles = np.arange(seq_len)[:, None] * _pair_frequencies(d_head, base)
    return np.cos(angles), np.sin(angles)


def apply_rope(x, cos, sin) -> np.ndarray:
    """Rotate each interleaved pair (x[..., 2i], x[..., 2i+1]) at position m by m * theta_i.

    x: (..., T, d_head); cos, sin: (T, d_head // 2) from `rope_angles(T, d_head)`.
    Returns an array shaped and typed like x. Rotating q and k this way makes q_m . k_n
    depend on the positions only through m - n.
    """
    x = as_float_array("x", x)
    require_ndim("x", x, 2)
    require_divisible("x last dim (d_head)", x.shape[-1], None, 2)
    cos, sin = as_float_array("cos", cos), as_float_array("sin", sin)
    require_shape("cos", cos, (x.shape[-2], x.shape[-1] // 2), "(T, d_head // 2) of x")
    require_shape("sin", sin, cos.shape, "shape of cos")
    cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x_even * cos - x_odd * sin
    out[..., 1::2] = x_even * sin + x_odd * cos
    return out


def apply_rope_backward(dout, cos, sin) -> np.ndarray:
    """Gradient w.r.t. x of `apply_rope(x, cos, sin)`.

    A rotation's transpose is its inverse, the rotation by the negative angle.
    """
    return apply_rope(dout, cos, -as_float_array("sin", sin))
