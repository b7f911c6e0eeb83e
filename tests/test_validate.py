"""tfcourse.nn.validate: each helper accepts good input and names the argument otherwise."""

import re

import numpy as np
import pytest

from tfcourse.nn.validate import (
    as_bool_array,
    as_float_array,
    as_float_dtype,
    as_int_array,
    require_broadcastable,
    require_dim,
    require_divisible,
    require_dtype,
    require_generator,
    require_last_dim,
    require_ndim,
    require_nonempty_axis,
    require_nonnegative_real,
    require_positive_int,
    require_real,
    require_shape,
)


def test_as_float_array_keeps_float_dtypes_and_converts_ints():
    x32 = np.ones(3, dtype=np.float32)
    assert as_float_array("x", x32).dtype == np.float32
    assert as_float_array("x", x32) is x32  # no copy for an array that is already fine
    converted = as_float_array("x", [1, 2, 3])
    assert converted.dtype == np.float64
    np.testing.assert_array_equal(converted, [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (["a", "b"], r"^x: expected a real numeric array, got dtype <U1"),
        (np.array([1 + 2j]), r"^x: expected a real numeric array, got dtype complex128"),
        ([[1.0, 2.0], [3.0]], r"^x: expected a numeric array, got list"),
        ([1.0, np.nan], r"^x: expected finite values, got nan at index \(1,\)"),
        ([[1.0, -np.inf]], r"^x: expected finite values, got -inf at index \(0, 1\)"),
    ],
)
def test_as_float_array_rejects(value, pattern):
    with pytest.raises(ValueError, match=pattern):
        as_float_array("x", value)


def test_as_float_array_allow_neg_inf_only_allows_minus_infinity():
    out = as_float_array("logits", [0.0, -np.inf], allow_neg_inf=True)
    assert np.isneginf(out[1])
    with pytest.raises(ValueError, match=r"^logits: expected finite values or -inf, got inf"):
        as_float_array("logits", [0.0, np.inf], allow_neg_inf=True)
    with pytest.raises(ValueError, match=r"^logits: .* got nan"):
        as_float_array("logits", [np.nan, -np.inf], allow_neg_inf=True)


def test_as_float_dtype():
    assert as_float_dtype("dtype", np.float32) == np.float32
    assert as_float_dtype("dtype", "float64") == np.float64
    with pytest.raises(ValueError, match=r"^dtype: expected a floating dtype .*got int64"):
        as_float_dtype("dtype", np.int64)
    with pytest.raises(ValueError, match=r"^dtype: expected a floating dtype, got 'banana'"):
        as_float_dtype("dtype", "banana")


def test_require_positive_int():
    assert require_positive_int("n", 3) == 3
    assert require_positive_int("n", np.int64(4)) == 4
    assert type(require_positive_int("n", np.int64(4))) is int
    for bad in (0, -2, 2.5, 2.0, True, "3", None):
        pattern = rf"^n: expected a positive integer, got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=pattern):
            require_positive_int("n", bad)


def test_require_real():
    assert require_real("k", -3) == -3.0
    assert require_real("base", 2.5, positive=True) == 2.5
    for bad in (np.inf, np.nan, "1", True, None):
        with pytest.raises(ValueError, match=r"^k: expected a finite real number"):
            require_real("k", bad)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match=r"^base: expected a positive finite number, got"):
            require_real("base", bad, positive=True)


def test_require_divisible():
    require_divisible("d_model", 12, "n_heads", 4)
    with pytest.raises(ValueError, match=r"^d_model: expected a multiple of n_heads=3, got 8 "):
        require_divisible("d_model", 8, "n_heads", 3)
    with pytest.raises(ValueError, match=r"^d_head: expected a multiple of 2, got 7 \(7 % 2 = 1\)"):
        require_divisible("d_head", 7, None, 2)


def test_require_generator():
    rng = np.random.default_rng(0)
    assert require_generator("rng", rng) is rng
    with pytest.raises(ValueError, match=r"^rng: expected a numpy.random.Generator .*got int"):
        require_generator("rng", 0)
    with pytest.raises(ValueError, match=r"^rng: .*got RandomState"):
        require_generator("rng", np.random.RandomState(0))


def test_require_ndim():
    x = np.zeros((2, 3))
    require_ndim("x", x, 2)
    require_ndim("x", x, 1, 2)
    with pytest.raises(ValueError, match=r"^q: expected at least 3 dims, got shape \(2, 3\)"):
        require_ndim("q", x, 3)
    with pytest.raises(ValueError, match=r"^q: expected 1 dim, got shape \(2, 3\)"):
        require_ndim("q", x, 1, 1)
    with pytest.raises(ValueError, match=r"^q: expected 3 to 4 dims, got shape \(2, 3\)"):
        require_ndim("q", x, 3, 4)


def test_require_dim_and_last_dim():
    x = np.zeros((2, 5, 8))
    require_dim("k", x, 1, 5)
    require_last_dim("k", x, 8)
    with pytest.raises(
        ValueError, match=r"^k: expected last dim 16 \(d_k of q\), got shape \(2, 5, 8\)$"
    ):
        require_last_dim("k", x, 16, "d_k of q")
    with pytest.raises(
        ValueError, match=r"^v: expected axis -2 of size 4 \(n_k of k\), got shape \(2, 5, 8\)$"
    ):
        require_dim("v", x, -2, 4, "n_k of k")


def test_require_shape():
    x = np.zeros((4, 3))
    require_shape("w", x, (4, 3))
    require_shape("w", x, (None, 3))
    with pytest.raises(ValueError, match=r"^w_k: expected shape \(6, 4\), got \(4, 3\)$"):
        require_shape("w_k", x, (6, 4))
    with pytest.raises(ValueError, match=r"^b: expected shape \(4,\) \(d_model\), got \(4, 3\)$"):
        require_shape("b", x, (4,), "d_model")
    with pytest.raises(ValueError, match=r"^w: expected shape \(any, 4\), got \(4, 3\)$"):
        require_shape("w", x, (None, 4))


def test_require_dtype():
    require_dtype("k", np.zeros(2, np.float32), np.float32)
    with pytest.raises(
        ValueError, match=r"^k: expected dtype float32 \(dtype of q\), got float64$"
    ):
        require_dtype("k", np.zeros(2), np.float32, "dtype of q")


def test_as_bool_array():
    mask = as_bool_array("mask", [[True, False]])
    assert mask.dtype == np.bool_ and mask.shape == (1, 2)
    with pytest.raises(ValueError, match=r"^mask: expected a bool array .*got dtype int64"):
        as_bool_array("mask", np.array([1, 0]))


def test_as_int_array():
    np.testing.assert_array_equal(as_int_array("lengths", [0, 3], 0, 3), [0, 3])
    with pytest.raises(ValueError, match=r"^lengths: expected integers, got dtype float64"):
        as_int_array("lengths", [2.5, 1.0], 0, 3)
    with pytest.raises(
        ValueError, match=r"^lengths: expected values in \[0, 3\], got 4 at index \(1,\)"
    ):
        as_int_array("lengths", [1, 4], 0, 3)
    with pytest.raises(ValueError, match=r"^lengths: expected values in \[0, 3\], got -1"):
        as_int_array("lengths", [-1], 0, 3)


def test_require_broadcastable():
    require_broadcastable("mask", np.zeros((1, 4)), (2, 3, 4))
    require_broadcastable("mask", np.zeros((2, 3, 4)), (2, 3, 4))
    with pytest.raises(
        ValueError, match=r"^mask: shape \(3, 5\) does not broadcast to \(2, 3, 4\) \(scores\)$"
    ):
        require_broadcastable("mask", np.zeros((3, 5)), (2, 3, 4), "scores")
    # Broadcasting that would enlarge the target is refused too.
    with pytest.raises(ValueError, match=r"^mask: shape \(5, 3, 4\) does not broadcast"):
        require_broadcastable("mask", np.zeros((5, 3, 4)), (1, 3, 4))


def test_require_nonempty_axis():
    """Issue 17: a softmax or maximum over an empty axis was NumPy's "zero-size array to
    reduction operation maximum which has no identity"."""
    require_nonempty_axis("x", np.zeros((0, 3)), -1)  # only the named axis must hold entries
    with pytest.raises(ValueError, match=r"^k: expected at least one key position along axis "
                                         r"-2, got shape \(2, 0, 4\)$"):
        require_nonempty_axis("k", np.zeros((2, 0, 4)), -2, "key position")
    for axis in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match=r"^axis: expected an axis of x \(an integer in "
                                             r"\[-2, 2\)\), got "):
            require_nonempty_axis("x", np.zeros((2, 3)), axis)


def test_require_nonnegative_real():
    assert require_nonnegative_real("alpha", 0) == 0.0
    assert require_nonnegative_real("n_bytes", np.int64(5)) == 5.0
    for bad in (-1e-9, float("nan"), float("inf"), "1", True, None):
        with pytest.raises(ValueError, match=r"^alpha: expected a non-negative finite number"):
            require_nonnegative_real("alpha", bad)
