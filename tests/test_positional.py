"""Tests for tfcourse.nn.positional against the closed-form formulas evaluated with math.sin/cos,
hand-written loops and finite differences."""

import math

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from tfcourse.nn.positional import (
    apply_rope,
    apply_rope_backward,
    init_learned_positions,
    learned_positions_backward,
    learned_positions_forward,
    relative_shift_matrix,
    rope_angles,
    sinusoidal_encoding,
    sinusoidal_wavelengths,
    wrong_quoted_encoding,
)

GRAD_TOL = 1e-6


def reference_encoding(max_len, d_model, base=10000.0):
    """PE[pos, j] from the paper's formula, one element at a time; pair index i = j // 2."""
    table = np.zeros((max_len, d_model))
    for pos in range(max_len):
        for j in range(d_model):
            i = j // 2
            angle = pos / base ** (2 * i / d_model)
            table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return table


# --------------------------------------------------------------------------- sinusoidal


@pytest.mark.parametrize(
    ("max_len", "d_model", "base"),
    [(12, 8, 10000.0), (7, 7, 10000.0), (5, 1, 10000.0), (9, 6, 100.0)],
)
def test_sinusoidal_matches_closed_form(max_len, d_model, base):
    table = sinusoidal_encoding(max_len, d_model, base=base)
    assert table.shape == (max_len, d_model) and table.dtype == np.float64
    np.testing.assert_allclose(table, reference_encoding(max_len, d_model, base), atol=1e-14)


def test_sinusoidal_hand_computed_rows():
    table = sinusoidal_encoding(3, 4)
    # Position 0: every sine is 0 and every cosine is 1.
    np.testing.assert_array_equal(table[0], [0.0, 1.0, 0.0, 1.0])
    # Position 2, d_model 4: frequencies 1 and 1/100.
    expected = [math.sin(2.0), math.cos(2.0), math.sin(0.02), math.cos(0.02)]
    np.testing.assert_allclose(table[2], expected, rtol=1e-15)


def test_sinusoidal_odd_d_model_last_column_is_sine_of_next_pair():
    d_model = 5
    table = sinusoidal_encoding(6, d_model)
    # Column 4 belongs to pair i = 2, so it is sin(pos / 10000^(4/5)); there is no cosine.
    expected = [math.sin(pos / 10000.0 ** (4 / 5)) for pos in range(6)]
    np.testing.assert_allclose(table[:, 4], expected, rtol=1e-15, atol=1e-16)
    # The first four columns are exactly those of d_model = 5, not of d_model = 4.
    assert not np.allclose(table[:, :4], sinusoidal_encoding(6, 4))


def test_sinusoidal_keeps_requested_dtype():
    table = sinusoidal_encoding(50, 6, dtype=np.float32)
    assert table.dtype == np.float32
    np.testing.assert_allclose(table, reference_encoding(50, 6), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_len": 0, "d_model": 4}, r"^max_len: expected a positive integer, got 0"),
        ({"max_len": 3.0, "d_model": 4}, r"^max_len: expected a positive integer, got 3.0"),
        ({"max_len": 3, "d_model": 2.5}, r"^d_model: expected a positive integer, got 2.5"),
        ({"max_len": 3, "d_model": -4}, r"^d_model: expected a positive integer, got -4"),
        ({"max_len": 3, "d_model": 4, "base": 0.0}, r"^base: expected a positive finite number"),
        ({"max_len": 3, "d_model": 4, "dtype": int}, r"^dtype: expected a floating dtype"),
    ],
)
def test_sinusoidal_rejects_bad_sizes(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sinusoidal_encoding(**kwargs)


def test_wavelengths_closed_form_and_match_the_table():
    lengths = sinusoidal_wavelengths(6)
    expected = [2 * math.pi * 10000.0 ** (2 * i / 6) for i in range(3)]
    np.testing.assert_allclose(lengths, expected, rtol=1e-15)
    assert lengths.shape == (3,)
    assert sinusoidal_wavelengths(7).shape == (4,)  # one per column pair, lone sine included
    # Column 2i is sin(2 pi pos / wavelength_i) for every column, odd d_model included.
    table = sinusoidal_encoding(20, 7)
    pos = np.arange(20)[:, None]
    np.testing.assert_allclose(table[:, 0::2], np.sin(2 * np.pi * pos / sinusoidal_wavelengths(7)))
    with pytest.raises(ValueError, match=r"^d_model: expected a positive integer"):
        sinusoidal_wavelengths(0)
    with pytest.raises(ValueError, match=r"^base: expected a positive finite number"):
        sinusoidal_wavelengths(4, base=-1.0)


def test_wrong_quoted_encoding_has_no_dimension_dependence():
    table = wrong_quoted_encoding(50, 6)
    assert table.shape == (50, 6)
    for pos in (0, 7, 49):
        value = math.sin(pos / 10000.0**2) + math.cos(pos / 10000.0**2)
        np.testing.assert_allclose(table[pos], value, rtol=1e-15)
    np.testing.assert_array_equal(table, np.repeat(table[:, :1], 6, axis=1))  # equal columns
    assert np.ptp(table) < 1e-6  # and nearly the same value, ~1, at every position
    table[0, 0] = 5.0  # a writable array, not a read-only broadcast view
    with pytest.raises(ValueError, match=r"^max_len: expected a positive integer"):
        wrong_quoted_encoding(0, 4)


@pytest.mark.parametrize(("k", "base"), [(0, 10000.0), (1, 10000.0), (5, 10000.0), (-3, 10000.0),
                                         (2, 50.0)])  # fmt: skip
def test_relative_shift_matrix_moves_encodings_by_k(k, base):
    d_model, max_len = 8, 20
    table = sinusoidal_encoding(max_len, d_model, base=base)
    m_k = relative_shift_matrix(k, d_model, base=base)
    assert m_k.shape == (d_model, d_model)
    for pos in range(max(0, -k), min(max_len, max_len - k)):
        np.testing.assert_allclose(table[pos] @ m_k, table[pos + k], atol=1e-12)


def test_relative_shift_matrix_structure():
    m = relative_shift_matrix(3, 4)
    b0, b1 = 3.0, 3.0 / 100.0  # k * omega_i with omega = 1, 1/100
    expected = np.array([
        [math.cos(b0), -math.sin(b0), 0, 0],
        [math.sin(b0), math.cos(b0), 0, 0],
        [0, 0, math.cos(b1), -math.sin(b1)],
        [0, 0, math.sin(b1), math.cos(b1)],
    ])  # fmt: skip
    np.testing.assert_allclose(m, expected, atol=1e-15)
    np.testing.assert_allclose(m @ m.T, np.eye(4), atol=1e-14)  # a rotation
    np.testing.assert_allclose(m @ relative_shift_matrix(2, 4), relative_shift_matrix(5, 4))
    np.testing.assert_array_equal(relative_shift_matrix(0, 4), np.eye(4))


def test_relative_shift_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^d_model: expected a multiple of 2, got 7"):
        relative_shift_matrix(1, 7)
    with pytest.raises(ValueError, match=r"^k: expected a finite real number, got 'a'"):
        relative_shift_matrix("a", 4)
    with pytest.raises(ValueError, match=r"^base: expected a positive finite number"):
        relative_shift_matrix(1, 4, base=0)


# --------------------------------------------------------------------------- learned


def test_init_learned_positions():
    table = init_learned_positions(16, 8, np.random.default_rng(0), dtype=np.float32)
    assert table.shape == (16, 8) and table.dtype == np.float32
    assert 0.01 < table.std() < 0.03
    again = init_learned_positions(16, 8, np.random.default_rng(0), dtype=np.float32)
    np.testing.assert_array_equal(table, again)
    with pytest.raises(ValueError, match=r"^rng: expected a numpy.random.Generator"):
        init_learned_positions(16, 8, 0)
    with pytest.raises(ValueError, match=r"^max_len: expected a positive integer"):
        init_learned_positions(0, 8, np.random.default_rng(0))


def test_learned_positions_forward_returns_first_rows_as_a_copy():
    table = np.arange(12.0).reshape(4, 3)
    out, _ = learned_positions_forward(table, 2)
    np.testing.assert_array_equal(out, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    out += 100.0
    np.testing.assert_array_equal(table, np.arange(12.0).reshape(4, 3))


def test_learned_positions_backward_hand_computed():
    _, cache = learned_positions_forward(np.zeros((4, 2)), 3)
    dout = np.arange(12.0).reshape(2, 3, 2)
    expected = np.array([[0 + 6, 1 + 7], [2 + 8, 3 + 9], [4 + 10, 5 + 11], [0, 0]], dtype=float)
    np.testing.assert_array_equal(learned_positions_backward(dout, cache), expected)


def test_learned_positions_backward_finite_differences():
    rng = np.random.default_rng(1)
    table = init_learned_positions(6, 3, rng)
    tokens = rng.standard_normal((2, 4, 3))
    g = rng.standard_normal((2, 4, 3))
    out, cache = learned_positions_forward(table, 4)
    dtable = learned_positions_backward(g, cache)

    def loss(t):
        return np.sum((tokens + learned_positions_forward(t, 4)[0]) * g)

    assert rel_error(dtable, numerical_gradient(loss, table)) < GRAD_TOL
    np.testing.assert_array_equal(dtable[4:], 0.0)


def test_learned_positions_rejects_bad_input():
    table = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"^seq_len: expected at most max_len=4 .*got 5"):
        learned_positions_forward(table, 5)
    with pytest.raises(ValueError, match=r"^seq_len: expected a positive integer"):
        learned_positions_forward(table, 0)
    with pytest.raises(ValueError, match=r"^table: expected 2 dims, got shape \(4,\)"):
        learned_positions_forward(np.zeros(4), 2)
    _, cache = learned_positions_forward(table, 3)
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 3, 2\) \(\(B, seq_len"):
        learned_positions_backward(np.zeros((2, 4, 2)), cache)
    with pytest.raises(ValueError, match=r"^dout: expected 2 to 3 dims"):
        learned_positions_backward(np.zeros((1, 2, 3, 2)), cache)
    with pytest.raises(ValueError, match=r"^dout: expected dtype float64"):
        learned_positions_backward(np.zeros((2, 3, 2), np.float32), cache)


# --------------------------------------------------------------------------- RoPE


def reference_rope(x, base=10000.0):
    """RoPE by hand: rotate pair (x[2i], x[2i+1]) at position m by m / base^(2i/d)."""
    *lead, seq_len, d_head = x.shape
    out = np.zeros_like(x)
    for b in np.ndindex(*lead):
        for m in range(seq_len):
            for i in range(d_head // 2):
                angle = m / base ** (2 * i / d_head)
                c, s = math.cos(angle), math.sin(angle)
                x0, x1 = x[b + (m, 2 * i)], x[b + (m, 2 * i + 1)]
                out[b + (m, 2 * i)] = x0 * c - x1 * s
                out[b + (m, 2 * i + 1)] = x0 * s + x1 * c
    return out


def test_rope_angles_closed_form():
    cos, sin = rope_angles(5, 6, base=100.0)
    assert cos.shape == sin.shape == (5, 3)
    for m in range(5):
        for i in range(3):
            theta = 100.0 ** (-2 * i / 6)
            assert cos[m, i] == pytest.approx(math.cos(m * theta), abs=1e-15)
            assert sin[m, i] == pytest.approx(math.sin(m * theta), abs=1e-15)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 6, 8)])
def test_apply_rope_matches_hand_loop(shape):
    x = np.random.default_rng(2).standard_normal(shape)
    cos, sin = rope_angles(shape[-2], shape[-1])
    np.testing.assert_allclose(apply_rope(x, cos, sin), reference_rope(x), atol=1e-14)


def test_apply_rope_hand_computed():
    # d_head 2: one pair, theta 1; position 1 turns (1, 0) by 1 radian, position 0 not at all.
    x = np.array([[3.0, 4.0], [1.0, 0.0]])
    out = apply_rope(x, *rope_angles(2, 2))
    np.testing.assert_array_equal(out[0], [3.0, 4.0])
    np.testing.assert_allclose(out[1], [math.cos(1.0), math.sin(1.0)], rtol=1e-15)


def test_apply_rope_preserves_norms_and_dtype():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6))
    out = apply_rope(x, *rope_angles(7, 6))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1))
    # Each pair keeps its own length too.
    np.testing.assert_allclose(np.hypot(out[..., 0::2], out[..., 1::2]),
                               np.hypot(x[..., 0::2], x[..., 1::2]))  # fmt: skip
    x32 = x.astype(np.float32)
    out32 = apply_rope(x32, *rope_angles(7, 6))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out, rtol=1e-5, atol=1e-6)


def test_rope_dot_product_depends_only_on_relative_position():
    rng = np.random.default_rng(4)
    seq_len, d_head = 12, 8
    q_vec, k_vec = rng.standard_normal(d_head), rng.standard_normal(d_head)
    cos, sin = rope_angles(seq_len, d_head)
    q = apply_rope(np.tile(q_vec, (seq_len, 1)), cos, sin)  # the same query at every position
    k = apply_rope(np.tile(k_vec, (seq_len, 1)), cos, sin)
    scores = q @ k.T  # scores[m, n] = rope(q, m) . rope(k, n)
    for offset in range(-3, 4):
        diagonal = np.diagonal(scores, offset=offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-12, atol=1e-12)
    # ... and it does depend on the offset (otherwise the check above would be vacuous).
    assert abs(scores[5, 5] - scores[5, 2]) > 1e-3


def test_apply_rope_backward_finite_differences_and_inverse():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6))
    g = rng.standard_normal(x.shape)
    cos, sin = rope_angles(4, 6)
    dx = apply_rope_backward(g, cos, sin)
    num = numerical_gradient(lambda xx: np.sum(apply_rope(xx, cos, sin) * g), x)
    assert rel_error(dx, num) < GRAD_TOL
    restored = apply_rope_backward(apply_rope(x, cos, sin), cos, sin)
    np.testing.assert_allclose(restored, x, atol=1e-14)


def test_rope_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^d_head: expected a multiple of 2, got 5"):
        rope_angles(4, 5)
    with pytest.raises(ValueError, match=r"^seq_len: expected a positive integer"):
        rope_angles(0, 4)
    cos, sin = rope_angles(4, 6)
    with pytest.raises(ValueError, match=r"^x last dim \(d_head\): expected a multiple of 2"):
        apply_rope(np.ones((4, 5)), cos, sin)
    with pytest.raises(
        ValueError, match=r"^cos: expected shape \(5, 3\) \(\(T, d_head // 2\) of x\), got \(4, 3\)"
    ):
        apply_rope(np.ones((5, 6)), cos, sin)
    with pytest.raises(ValueError, match=r"^sin: expected shape \(4, 3\) \(shape of cos\)"):
        apply_rope(np.ones((4, 6)), cos, sin[:, :2])
    with pytest.raises(ValueError, match=r"^x: expected at least 2 dims"):
        apply_rope(np.ones(6), cos, sin)
    with pytest.raises(ValueError, match=r"^sin: .*got nan"):
        apply_rope_backward(np.ones((4, 6)), cos, np.full_like(sin, np.nan))
