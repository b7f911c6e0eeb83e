"""Tests for tfcourse.nn.attention against hand-written loops, hand-computed cases and finite
differences."""

import math

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from tfcourse.nn.attention import (
    causal_mask,
    init_mha_params,
    merge_heads,
    mha_backward,
    mha_forward,
    mha_forward_loop,
    mha_param_count,
    padding_mask,
    scaled_dot_product_attention,
    sdpa_backward,
    sdpa_forward,
    softmax,
    softmax_backward,
    split_heads,
)

GRAD_TOL = 1e-6
NAN_OR_OVERFLOW = {"over": "raise", "invalid": "raise", "divide": "raise"}


def reference_attention(q, k, v, mask=None):
    """Attention written out element by element with math.exp; returns (out, weights)."""
    *lead, n_q, d_k = q.shape
    n_k, d_v = v.shape[-2:]
    allowed = np.ones((*lead, n_q, n_k), dtype=bool)
    if mask is not None:
        allowed = np.broadcast_to(mask, allowed.shape)
    out = np.zeros((*lead, n_q, d_v))
    weights = np.zeros((*lead, n_q, n_k))
    for b in np.ndindex(*lead):
        for i in range(n_q):
            keys = [j for j in range(n_k) if allowed[b + (i, j)]]
            if not keys:
                continue  # nothing to attend to: zero weights and output
            scores = {
                j: sum(float(q[b + (i, t)]) * float(k[b + (j, t)]) for t in range(d_k))
                / math.sqrt(d_k)
                for j in keys
            }
            top = max(scores.values())
            exps = {j: math.exp(s - top) for j, s in scores.items()}
            total = sum(exps.values())
            for j in keys:
                weights[b + (i, j)] = exps[j] / total
            for c in range(d_v):
                out[b + (i, c)] = sum(weights[b + (i, j)] * float(v[b + (j, c)]) for j in keys)
    return out, weights


def random_qkv(rng, lead, n_q, n_k, d_k, d_v, dtype=np.float64):
    q = rng.standard_normal((*lead, n_q, d_k)).astype(dtype)
    k = rng.standard_normal((*lead, n_k, d_k)).astype(dtype)
    v = rng.standard_normal((*lead, n_k, d_v)).astype(dtype)
    return q, k, v


# --------------------------------------------------------------------------- softmax


def test_softmax_hand_computed():
    # exp(0) : exp(ln 2) : exp(ln 3) = 1 : 2 : 3
    probs = softmax(np.array([0.0, math.log(2.0), math.log(3.0)]))
    np.testing.assert_allclose(probs, [1 / 6, 2 / 6, 3 / 6], rtol=1e-14)


def test_softmax_matches_math_exp_reference_on_any_axis():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    expected = np.zeros_like(x)
    for col in range(4):
        total = sum(math.exp(x[r, col]) for r in range(3))
        for r in range(3):
            expected[r, col] = math.exp(x[r, col]) / total
    np.testing.assert_allclose(softmax(x, axis=0), expected, rtol=1e-13)
    np.testing.assert_allclose(softmax(x.T), expected.T, rtol=1e-13)


def test_softmax_large_logits_do_not_overflow():
    with np.errstate(**NAN_OR_OVERFLOW):
        probs = softmax(np.array([[1e4, 1e4], [1e4, 0.0], [-1e4, 1e4]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], atol=0)


def test_softmax_rows_sum_to_one_and_shift_invariance():
    rng = np.random.default_rng(1)
    x = 5 * rng.standard_normal((2, 3, 7))
    probs = softmax(x)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-14)
    assert np.all(probs > 0)
    np.testing.assert_allclose(softmax(x + 123.4), probs, rtol=1e-12)
    np.testing.assert_allclose(softmax(x - rng.standard_normal((2, 3, 1))), probs, rtol=1e-12)


def test_softmax_minus_infinity_entries_and_rows():
    x = np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]])
    with np.errstate(**NAN_OR_OVERFLOW):
        probs = softmax(x)
    np.testing.assert_array_equal(probs, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])


def test_softmax_keeps_float32():
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    probs = softmax(x)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, softmax(x.astype(np.float64)), rtol=1e-6)
    assert softmax(np.array([-np.inf, 1.0], dtype=np.float32)).dtype == np.float32


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_backward_finite_differences(axis):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal(x.shape)
    dx = softmax_backward(g, softmax(x, axis=axis), axis=axis)
    num = numerical_gradient(lambda xx: np.sum(softmax(xx, axis=axis) * g), x)
    assert rel_error(dx, num) < GRAD_TOL


def test_softmax_backward_of_masked_entries_is_zero():
    x = np.array([[0.5, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]])
    dx = softmax_backward(np.ones_like(x) * [1.0, 2.0, 3.0], softmax(x))
    assert dx[0, 1] == 0.0
    np.testing.assert_array_equal(dx[1], 0.0)


def test_softmax_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^x: .*got nan"):
        softmax([1.0, np.nan])
    with pytest.raises(ValueError, match=r"^x: expected finite values or -inf, got inf"):
        softmax([1.0, np.inf])
    with pytest.raises(ValueError, match=r"^x: expected a real numeric array"):
        softmax(["a"])
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 3\) \(shape of probs\)"):
        softmax_backward(np.ones((3, 2)), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"^dout: expected dtype float32"):
        softmax_backward(np.ones(3), np.full(3, 1 / 3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"^probs: .*got nan"):
        softmax_backward(np.ones(2), [np.nan, 1.0])


# --------------------------------------------------------------------------- masks


def test_causal_mask_hand_written():
    expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
    mask = causal_mask(3)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(causal_mask(1), [[True]])


def test_padding_mask_hand_written():
    mask = padding_mask([2, 0, 3], 3)
    expected = np.array([[[1, 1, 0]], [[0, 0, 0]], [[1, 1, 1]]], dtype=bool)
    assert mask.shape == (3, 1, 3) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(padding_mask(np.array([1], dtype=np.uint8), 2), [[[1, 0]]])


@pytest.mark.parametrize("n", [0, -1, 2.5, 3.0, None])
def test_causal_mask_rejects_bad_size(n):
    with pytest.raises(ValueError, match=r"^n: expected a positive integer"):
        causal_mask(n)


@pytest.mark.parametrize(
    ("lengths", "n", "pattern"),
    [
        ([2.5, 1.0], 3, r"^lengths: expected integers, got dtype float64"),
        ([2.0, 1.0], 3, r"^lengths: expected integers, got dtype float64"),
        ([True, False], 3, r"^lengths: expected integers, got dtype bool"),
        ([1, 4], 3, r"^lengths: expected values in \[0, 3\], got 4"),
        ([-1], 3, r"^lengths: expected values in \[0, 3\], got -1"),
        ([[1, 2]], 3, r"^lengths: expected 1 dim, got shape \(1, 2\)"),
        ([1], 0, r"^n: expected a positive integer, got 0"),
    ],
)
def test_padding_mask_rejects_bad_input(lengths, n, pattern):
    with pytest.raises(ValueError, match=pattern):
        padding_mask(lengths, n)


# --------------------------------------------------------------------------- attention


def test_attention_hand_computed():
    # scale 1/sqrt(4) = 1/2, so scores are [0, ln 3] and the weights are [1/4, 3/4].
    q = np.array([[2.0, 0.0, 0.0, 0.0]])
    k = np.array([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]])
    v = np.array([[4.0, -8.0], [0.0, 4.0]])
    out, weights = scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(weights, [[0.25, 0.75]], rtol=1e-14)
    np.testing.assert_allclose(out, [[1.0, 1.0]], rtol=1e-14)
    # Masking out key 1 leaves all the weight on key 0.
    out, weights = scaled_dot_product_attention(q, k, v, mask=np.array([[True, False]]))
    np.testing.assert_array_equal(weights, [[1.0, 0.0]])
    np.testing.assert_array_equal(out, [[4.0, -8.0]])


def _mask_for(kind, rng, lead, n_q, n_k):
    if kind == "none":
        return None
    if kind == "causal":
        return causal_mask(n_q)
    if kind == "padding":  # (B, 1, n_k); the last sequence is empty, so all its rows are masked
        lengths = rng.integers(1, n_k + 1, size=lead[0])
        lengths[-1] = 0
        return padding_mask(lengths, n_k)
    # a random per-row mask with one query row that may attend to nothing
    mask = rng.random((*lead, n_q, n_k)) < 0.6
    mask[(0,) * len(lead) + (1,)] = False
    return mask


SDPA_CASES = [
    # (lead dims, n_q, n_k, d_k, d_v, mask kind)
    ((), 3, 4, 2, 3, "none"),
    ((2, 3), 3, 4, 4, 5, "none"),
    ((2,), 4, 4, 3, 2, "causal"),
    ((2, 3), 4, 4, 2, 3, "causal"),
    ((3,), 2, 5, 4, 3, "padding"),
    ((2, 3), 3, 4, 3, 2, "random_with_empty_row"),
]


@pytest.mark.parametrize(("lead", "n_q", "n_k", "d_k", "d_v", "kind"), SDPA_CASES)
def test_attention_matches_elementwise_reference(lead, n_q, n_k, d_k, d_v, kind):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, lead, n_q, n_k, d_k, d_v)
    mask = _mask_for(kind, rng, lead, n_q, n_k)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    ref_out, ref_weights = reference_attention(q, k, v, mask)
    assert out.shape == (*lead, n_q, d_v) and weights.shape == (*lead, n_q, n_k)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("lead", "n_q", "n_k", "d_k", "d_v", "kind"), SDPA_CASES)
def test_sdpa_backward_finite_differences(lead, n_q, n_k, d_k, d_v, kind):
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, lead, n_q, n_k, d_k, d_v)
    mask = _mask_for(kind, rng, lead, n_q, n_k)
    g = rng.standard_normal((*lead, n_q, d_v))
    out, cache = sdpa_forward(q, k, v, mask)
    dq, dk, dv = sdpa_backward(g, cache)

    def loss(qq, kk, vv):
        return np.sum(sdpa_forward(qq, kk, vv, mask)[0] * g)

    assert rel_error(dq, numerical_gradient(lambda x: loss(x, k, v), q)) < GRAD_TOL
    assert rel_error(dk, numerical_gradient(lambda x: loss(q, x, v), k)) < GRAD_TOL
    assert rel_error(dv, numerical_gradient(lambda x: loss(q, k, x), v)) < GRAD_TOL


def test_fully_masked_row_gives_zeros_and_zero_gradients():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, (2,), 3, 4, 2, 3)
    mask = np.ones((2, 3, 4), dtype=bool)
    mask[1, 2] = False  # query 2 of sequence 1 may attend to nothing
    with np.errstate(**NAN_OR_OVERFLOW):
        out, cache = sdpa_forward(q, k, v, mask)
        dq, dk, dv = sdpa_backward(rng.standard_normal(out.shape), cache)
    for a in (out, cache["weights"], dq, dk, dv):
        assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(out[1, 2], 0.0)
    np.testing.assert_array_equal(cache["weights"][1, 2], 0.0)
    np.testing.assert_array_equal(dq[1, 2], 0.0)
    assert np.any(out[1, :2] != 0) and np.all(cache["weights"][1, :2].sum(-1) > 0.999)


def test_attention_large_scores_do_not_overflow():
    q = np.array([[300.0, 0.0], [0.0, 0.0]])
    k = np.array([[300.0, 0.0], [-300.0, 0.0]])
    v = np.array([[1.0], [2.0]])
    with np.errstate(**NAN_OR_OVERFLOW):
        out, weights = scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(weights, [[1.0, 0.0], [0.5, 0.5]], atol=0)
    np.testing.assert_allclose(out, [[1.0], [1.5]])


def test_attention_keeps_float32():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, (2,), 3, 4, 4, 2, dtype=np.float32)
    mask = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    out, cache = sdpa_forward(q, k, v, mask)
    assert out.dtype == np.float32 and cache["weights"].dtype == np.float32
    grads = sdpa_backward(np.ones_like(out), cache)
    assert all(g.dtype == np.float32 for g in grads)
    ref_out, _ = reference_attention(q, k, v, mask)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shapes", "mask", "pattern"),
    [
        (((5,), (4, 5), (4, 2)), None, r"^q: expected at least 2 dims, got shape \(5,\)"),
        (((3, 5), (4,), (4, 2)), None, r"^k: expected at least 2 dims"),
        (
            ((2, 5, 16), (2, 5, 8), (2, 5, 3)),
            None,
            r"^k: expected last dim 16 \(d_k of q\), got shape \(2, 5, 8\)$",
        ),
        (((3, 8), (4, 8), (5, 2)), None, r"^v: expected axis -2 of size 4 \(n_k of k\), got"),
        (
            ((2, 3, 8), (3, 4, 8), (3, 4, 2)),
            None,
            r"^k: expected shape \(2, 4, 8\) \(leading dims of q \(2,\)\), got \(3, 4, 8\)",
        ),
        (
            ((2, 3, 8), (2, 4, 8), (2, 4, 2)),
            np.ones((3, 3), dtype=bool),
            r"^mask: shape \(3, 3\) does not broadcast to \(2, 3, 4\)",
        ),
        (
            ((3, 8), (4, 8), (4, 2)),
            np.ones((3, 4)),
            r"^mask: expected a bool array \(True = keep\), got dtype float64",
        ),
    ],
)
def test_attention_rejects_bad_input(shapes, mask, pattern):
    q, k, v = (np.ones(s) for s in shapes)
    with pytest.raises(ValueError, match=pattern):
        scaled_dot_product_attention(q, k, v, mask)


def test_attention_rejects_mixed_dtypes_and_bad_dout():
    q = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"^v: expected dtype float64 \(dtype of q\), got float32"):
        sdpa_forward(q, q, q.astype(np.float32))
    with pytest.raises(ValueError, match=r"^q: .*got nan"):
        sdpa_forward(np.full((3, 2), np.nan), q, q)
    out, cache = sdpa_forward(q, q, q)
    with pytest.raises(ValueError, match=r"^dout: expected shape \(3, 2\) \(shape of out\)"):
        sdpa_backward(np.ones((2, 3)), cache)
    with pytest.raises(ValueError, match=r"^dout: expected dtype float64"):
        sdpa_backward(np.ones((3, 2), dtype=np.float32), cache)


# --------------------------------------------------------------------------- multi-head


def _random_params(rng, d_model, n_heads, d_kv_in=None):
    params = init_mha_params(d_model, n_heads, rng, d_kv_in=d_kv_in)
    for name in ("b_q", "b_k", "b_v", "b_o"):  # non-zero biases so their gradients matter
        params[name] = 0.5 * rng.standard_normal(d_model)
    return params


def test_init_mha_params_keys_shapes_dtype():
    params = init_mha_params(8, 2, np.random.default_rng(0), d_kv_in=6, dtype=np.float32)
    expected = {
        "w_q": (8, 8), "w_k": (6, 8), "w_v": (6, 8), "w_o": (8, 8),
        "b_q": (8,), "b_k": (8,), "b_v": (8,), "b_o": (8,),
    }  # fmt: skip
    assert {name: p.shape for name, p in params.items()} == expected
    assert all(p.dtype == np.float32 for p in params.values())
    for name in ("b_q", "b_k", "b_v", "b_o"):
        np.testing.assert_array_equal(params[name], 0.0)
    # Glorot uniform: |w| <= sqrt(6 / (fan_in + fan_out)) and not degenerate.
    assert np.abs(params["w_k"]).max() <= math.sqrt(6 / 14)
    assert params["w_q"].std() > 0.2
    assert sum(p.size for p in params.values()) == mha_param_count(8, d_kv_in=6)


def test_init_mha_params_is_reproducible():
    a = init_mha_params(4, 2, np.random.default_rng(7))
    b = init_mha_params(4, 2, np.random.default_rng(7))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["w_q"], a["w_k"])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"d_model": 8, "n_heads": 3}, r"^d_model: expected a multiple of n_heads=3, got 8"),
        ({"d_model": 0, "n_heads": 1}, r"^d_model: expected a positive integer, got 0"),
        ({"d_model": 8, "n_heads": 2.0}, r"^n_heads: expected a positive integer, got 2.0"),
        ({"d_model": 8, "n_heads": 2, "d_kv_in": -1}, r"^d_kv_in: expected a positive"),
        ({"d_model": 8, "n_heads": 2, "rng": 0}, r"^rng: expected a numpy.random.Generator"),
        ({"d_model": 8, "n_heads": 2, "dtype": np.int32}, r"^dtype: expected a floating dtype"),
    ],
)
def test_init_mha_params_rejects_bad_input(kwargs, pattern):
    kwargs = {"rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=pattern):
        init_mha_params(**kwargs)


def test_mha_param_count_hand_computed():
    assert mha_param_count(4) == 4 * 16 + 4 * 4
    assert mha_param_count(4, bias=False) == 64
    assert mha_param_count(4, d_kv_in=6) == 2 * 16 + 2 * 24 + 16
    with pytest.raises(ValueError, match=r"^d_kv_in: expected a positive integer"):
        mha_param_count(4, d_kv_in=0)


def test_split_heads_hand_written_and_merge_inverts_it():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # d_model 4, 2 heads of width 2
    heads = split_heads(x, 2)
    assert heads.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(heads[0, 0], [[0, 1], [4, 5], [8, 9]])
    np.testing.assert_array_equal(heads[1, 1], [[14, 15], [18, 19], [22, 23]])
    np.testing.assert_array_equal(merge_heads(heads), x)
    with pytest.raises(ValueError, match=r"^d_model: expected a multiple of n_heads=3, got 4"):
        split_heads(x, 3)
    with pytest.raises(ValueError, match=r"^x: expected at least 3 dims, got shape \(3, 4\)"):
        merge_heads(x[0])


def _mha_mask(kind, rng, batch, n_heads, n_q, n_k):
    if kind is None:
        return None
    if kind == "causal":
        return causal_mask(n_q)
    if kind == "padding":  # the last sequence is empty: all its query rows are fully masked
        lengths = rng.integers(1, n_k + 1, size=batch)
        lengths[-1] = 0
        return padding_mask(lengths, n_k)
    shape = {"per_row": (batch, n_q, n_k), "per_head": (batch, n_heads, n_q, n_k),
             "head_only": (1, n_heads, 1, n_k), "query_row": (n_q, 1)}[kind]  # fmt: skip
    mask = rng.random(shape) < 0.7
    mask[(0,) * (mask.ndim - 1)] = True  # keep at least one attended entry per test
    return mask


MHA_CASES = [
    # (batch, n_q, n_k, d_model, n_heads, d_kv_in (None = self-attention), mask kind)
    (2, 3, 3, 4, 2, None, None),
    (2, 4, 4, 6, 3, None, "causal"),
    (3, 3, 3, 4, 2, None, "padding"),
    (2, 3, 3, 4, 1, None, "per_row"),
    (2, 3, 5, 4, 2, 6, None),
    (2, 2, 4, 6, 2, 3, "padding"),
    (2, 3, 4, 4, 2, 5, "per_head"),
    (2, 3, 4, 4, 2, 5, "head_only"),
    (2, 3, 4, 4, 4, 5, "query_row"),
]


MHA_ARGS = ("batch", "n_q", "n_k", "d_model", "n_heads", "d_kv_in", "kind")


@pytest.mark.parametrize(MHA_ARGS, MHA_CASES)
def test_mha_forward_equals_loop_over_heads(batch, n_q, n_k, d_model, n_heads, d_kv_in, kind):
    rng = np.random.default_rng(8)
    params = _random_params(rng, d_model, n_heads, d_kv_in)
    x_q = rng.standard_normal((batch, n_q, d_model))
    x_kv = x_q if d_kv_in is None else rng.standard_normal((batch, n_k, d_kv_in))
    mask = _mha_mask(kind, rng, batch, n_heads, n_q, n_k)
    out, _ = mha_forward(x_q, x_kv, params, n_heads, mask)
    assert out.shape == (batch, n_q, d_model)
    np.testing.assert_allclose(out, mha_forward_loop(x_q, x_kv, params, n_heads, mask), atol=1e-12)


def test_mha_single_head_matches_elementwise_reference():
    rng = np.random.default_rng(9)
    params = _random_params(rng, 3, 1, d_kv_in=2)
    x_q, x_kv = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 4, 2))
    mask = padding_mask([4, 1], 4)
    q = x_q @ params["w_q"] + params["b_q"]
    k = x_kv @ params["w_k"] + params["b_k"]
    v = x_kv @ params["w_v"] + params["b_v"]
    expected = reference_attention(q, k, v, mask)[0] @ params["w_o"] + params["b_o"]
    out, _ = mha_forward(x_q, x_kv, params, 1, mask)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    MHA_ARGS,
    [
        (2, 3, 3, 4, 2, None, "causal"),
        (2, 2, 4, 4, 2, 3, "padding"),
        (2, 3, 4, 4, 2, 5, "per_head"),
    ],
)
def test_mha_backward_finite_differences(batch, n_q, n_k, d_model, n_heads, d_kv_in, kind):
    rng = np.random.default_rng(10)
    params = _random_params(rng, d_model, n_heads, d_kv_in)
    x_q = rng.standard_normal((batch, n_q, d_model))
    x_kv = rng.standard_normal((batch, n_k, d_kv_in or d_model))
    mask = _mha_mask(kind, rng, batch, n_heads, n_q, n_k)
    g = rng.standard_normal((batch, n_q, d_model))
    out, cache = mha_forward(x_q, x_kv, params, n_heads, mask)
    dx_q, dx_kv, grads = mha_backward(g, cache)
    assert set(grads) == set(params)

    def loss(xq, xkv, p):
        return np.sum(mha_forward(xq, xkv, p, n_heads, mask)[0] * g)

    assert rel_error(dx_q, numerical_gradient(lambda x: loss(x, x_kv, params), x_q)) < GRAD_TOL
    assert rel_error(dx_kv, numerical_gradient(lambda x: loss(x_q, x, params), x_kv)) < GRAD_TOL
    for name, value in params.items():
        num = numerical_gradient(lambda p, name=name: loss(x_q, x_kv, {**params, name: p}), value)
        assert grads[name].shape == value.shape
        if name == "b_k":
            # Adding b to every key adds q . b to all scores of a query row, which softmax
            # ignores: the true gradient is exactly zero, so compare absolute values.
            np.testing.assert_allclose(grads[name], 0.0, atol=1e-12)
            np.testing.assert_allclose(num, 0.0, atol=1e-8)
        else:
            assert rel_error(grads[name], num) < GRAD_TOL, name


def test_mha_self_attention_gradient_is_dx_q_plus_dx_kv():
    rng = np.random.default_rng(11)
    params = _random_params(rng, 4, 2)
    x = rng.standard_normal((2, 3, 4))
    g = rng.standard_normal(x.shape)
    mask = causal_mask(3)
    out, cache = mha_forward(x, x, params, 2, mask)
    dx_q, dx_kv, _ = mha_backward(g, cache)
    num = numerical_gradient(lambda xx: np.sum(mha_forward(xx, xx, params, 2, mask)[0] * g), x)
    assert rel_error(dx_q + dx_kv, num) < GRAD_TOL
    assert rel_error(dx_q, num) > 1e-3  # dx_q alone is not the whole gradient


def test_mha_fully_masked_row():
    rng = np.random.default_rng(12)
    params = _random_params(rng, 4, 2)
    x_q, x_kv = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    mask = np.ones((2, 3, 5), dtype=bool)
    mask[0, 1] = False  # query 1 of sequence 0 may attend to nothing
    with np.errstate(**NAN_OR_OVERFLOW):
        out, cache = mha_forward(x_q, x_kv, params, 2, mask)
        dx_q, dx_kv, grads = mha_backward(rng.standard_normal(out.shape), cache)
    for a in (out, dx_q, dx_kv, *grads.values()):
        assert np.all(np.isfinite(a))
    # Every head outputs zeros for that row, so only the output bias remains.
    np.testing.assert_array_equal(out[0, 1], params["b_o"])
    np.testing.assert_array_equal(dx_q[0, 1], 0.0)
    assert np.all(np.abs(out[0, 0] - params["b_o"]) > 0)


def test_mha_keeps_float32():
    rng = np.random.default_rng(13)
    params = init_mha_params(4, 2, rng, dtype=np.float32)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out, cache = mha_forward(x, x, params, 2, causal_mask(3))
    assert out.dtype == np.float32
    dx_q, dx_kv, grads = mha_backward(np.ones_like(out), cache)
    assert dx_q.dtype == dx_kv.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


def _mha_call(forward, rng, change):
    """Call `forward` on valid inputs (B=2, n_q=3, n_k=4, d_model=4, d_kv_in=5, 2 heads)
    after applying `change` to them."""
    args = {
        "x_q": rng.standard_normal((2, 3, 4)),
        "x_kv": rng.standard_normal((2, 4, 5)),
        "params": init_mha_params(4, 2, rng, d_kv_in=5),
        "n_heads": 2,
        "mask": None,
    }
    change(args)
    return forward(**args)


def _set(key, value):
    return lambda args: args.__setitem__(key, value)


def _set_param(key, value):
    return lambda args: args["params"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda a: a["params"].pop("b_o"), r"^params: expected keys \[.*'b_o'.*\], got \["),
        (_set_param("extra", np.ones(2)), r"^params: expected keys .*'extra'"),
        (_set("params", [1, 2]), r"^params: expected keys .*got list"),
        (_set_param("w_k", np.ones((4, 4))), r"^w_v: expected shape \(4, 4\), got \(5, 4\)"),
        (_set_param("w_o", np.ones((4, 3))), r"^w_o: expected shape \(4, 4\), got \(4, 3\)"),
        (_set_param("b_q", np.ones(3)), r"^b_q: expected shape \(4,\), got \(3,\)"),
        (_set_param("w_q", np.ones(4)), r"^w_q: expected 2 dims, got shape \(4,\)"),
        (
            _set_param("w_v", np.ones((5, 4), np.float32)),
            r"^w_v: expected dtype float64 \(dtype of w_q\), got float32",
        ),
        (_set("n_heads", 3), r"^d_model: expected a multiple of n_heads=3, got 4"),
        (_set("n_heads", 0), r"^n_heads: expected a positive integer, got 0"),
        (_set("x_q", np.ones((3, 4))), r"^x_q: expected 3 dims, got shape \(3, 4\)"),
        (
            _set("x_q", np.ones((2, 3, 5))),
            r"^x_q: expected last dim 4 \(d_model = rows of w_q\), got shape \(2, 3, 5\)",
        ),
        (_set("x_kv", np.ones((2, 4, 4))), r"^x_kv: expected last dim 5 \(d_kv_in = rows of w_k"),
        (_set("x_kv", np.ones((3, 4, 5))), r"^x_kv: expected axis 0 of size 2 \(batch size of x_q"),
        (
            _set("x_q", np.ones((2, 3, 4), np.float32)),
            r"^x_q: expected dtype float64 \(dtype of the params\), got float32",
        ),
        (_set("mask", np.ones(4, bool)), r"^mask: expected 2, 3 or 4 dims.*got shape \(4,\)"),
        (
            _set("mask", np.ones((3, 3), bool)),
            r"^mask: shape \(3, 3\) does not broadcast to \(3, 4\) \(\(n_q, n_k\)\)",
        ),
        (
            _set("mask", np.ones((3, 1, 4), bool)),
            r"^mask: shape \(3, 1, 4\) does not broadcast to \(2, 3, 4\) \(\(B, n_q, n_k\)\)",
        ),
        (_set("mask", np.ones((2, 3, 3, 4), bool)), r"^mask: .*\(2, 2, 3, 4\) \(\(B, n_heads"),
        (_set("mask", np.ones((3, 4), int)), r"^mask: expected a bool array"),
    ],
)
@pytest.mark.parametrize("forward", [mha_forward, mha_forward_loop])
def test_mha_rejects_bad_input(forward, change, pattern):
    with pytest.raises(ValueError, match=pattern):
        _mha_call(forward, np.random.default_rng(14), change)


def test_mha_backward_rejects_bad_dout():
    rng = np.random.default_rng(15)
    params = init_mha_params(4, 2, rng)
    x = rng.standard_normal((2, 3, 4))
    _, cache = mha_forward(x, x, params, 2)
    with pytest.raises(ValueError, match=r"^dout: expected shape \(2, 3, 4\) \(shape of out\)"):
        mha_backward(np.ones((2, 4, 4)), cache)
