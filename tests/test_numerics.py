"""Numerics: float32 training follows float64 training, and the numerically delicate layers
(softmax, LayerNorm, cross-entropy) stay finite - and right - for extreme inputs in both
dtypes: logits of +-1e4, constant rows, and rows that are entirely -inf where that means
something (a query with nothing to attend to, a padding position the loss ignores)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from tfcourse import train
from tfcourse.nn.attention import sdpa_backward, sdpa_forward, softmax, softmax_backward
from tfcourse.nn.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    layernorm_backward,
    layernorm_forward,
    log_softmax,
)
from tfcourse.nn.model import preset

DTYPES = [np.float32, np.float64]
STEPS = 30

# Max relative difference |loss32 - loss64| / loss64 over the first 30 steps of the tiny LM,
# measured on this machine (OpenBLAS, x86-64) for seeds 0-3: 1.04e-7, 1.00e-7, 0.87e-7,
# 0.77e-7 - about one float32 ulp (1.19e-7), because clipping and Adam's normalised steps
# keep the rounding from growing this early. RTOL leaves a 100x margin for other BLAS
# builds and CPUs (a different summation order changes float32 results by a few ulps per
# matmul) and for longer chains of updates; a real dtype bug (a silent upcast, an
# accumulator in float16, a mis-scaled gradient) moves the curve by 1e-3 or more.
CURVE_RTOL = 1e-5


@pytest.fixture(scope="module")
def curves() -> dict[str, dict]:
    corpus = train.load_corpus()
    settings = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=STEPS)
    return {dtype: train.train_lm(preset("tiny", corpus.vocab.size, dtype=dtype), corpus,
                                  settings, progress="none")
            for dtype in ("float32", "float64")}


def test_float32_training_curve_follows_float64(curves):
    loss32 = np.array(curves["float32"]["losses"])
    loss64 = np.array(curves["float64"]["losses"])
    assert {p.dtype for p in curves["float32"]["params"].values()} == {np.dtype(np.float32)}
    rel = np.abs(loss32 - loss64) / loss64
    print(f"\nfloat32 vs float64 over {STEPS} steps: max relative difference {rel.max():.2e}")
    assert rel.max() < CURVE_RTOL
    assert rel.max() > 0, "the float32 run must really compute in float32"
    assert loss64[-1] < 0.8 * loss64[0]  # and both actually learned


def finite_and_quiet(fn, *args):
    """Run fn(*args) with NumPy's overflow, invalid-value (NaN) and divide-by-zero warnings
    turned into errors: no detour through inf or NaN, even one that is masked out later.
    Underflow (exp of a very negative number becoming 0) is exactly what stable softmax
    relies on, so it stays allowed."""
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise",
                                                under="ignore"):
        warnings.simplefilter("error")
        return fn(*args)


def all_finite(*arrays) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in arrays)


EXTREME_ROWS = {
    "+-1e4": [1e4, -1e4, 0.0, 3.0],
    "constant": [5.0, 5.0, 5.0, 5.0],
    "one -inf": [-np.inf, 1e4, 2.0, -1e4],
    "all -inf": [-np.inf] * 4,
}


# --------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", EXTREME_ROWS)
def test_softmax_extreme_rows(row, dtype):
    x = np.array([EXTREME_ROWS[row]], dtype=dtype)
    probs = finite_and_quiet(softmax, x)
    dx = finite_and_quiet(softmax_backward, np.arange(4, dtype=dtype)[None], probs)
    assert probs.dtype == dtype and all_finite(probs, dx)
    expected = {"+-1e4": [1, 0, 0, 0], "constant": [0.25] * 4, "one -inf": [0, 1, 0, 0],
                "all -inf": [0, 0, 0, 0]}[row]  # all -inf: nothing to attend to, zeros
    np.testing.assert_allclose(probs[0], expected, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_with_huge_scores_and_a_fully_masked_query(dtype):
    q = np.array([[[100.0, -100.0], [1.0, 1.0]]], dtype=dtype)  # scores up to +-1e4 / sqrt(2)
    k = np.array([[[100.0, -100.0], [-100.0, 100.0]]], dtype=dtype)
    v = np.array([[[1.0, 2.0], [3.0, 4.0]]], dtype=dtype)
    mask = np.array([[True, True], [False, False]])  # query 1 may attend to nothing
    out, cache = finite_and_quiet(sdpa_forward, q, k, v, mask)
    grads = finite_and_quiet(sdpa_backward, np.ones_like(out), cache)
    assert out.dtype == dtype and all_finite(out, *grads)
    np.testing.assert_allclose(out[0], [[1.0, 2.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- LayerNorm

LN_ROWS = {
    "+-1e4": [1e4, -1e4, 0.0, 3.0],
    "large offset": [1e4 + 1, 1e4 - 1, 1e4 + 1, 1e4 - 1],
    "constant": [5.0, 5.0, 5.0, 5.0],  # variance 0: only eps keeps 1/sqrt(var + eps) finite
    "tiny": [1e-30, -1e-30, 0.0, 0.0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", LN_ROWS)
def test_layernorm_extreme_rows(row, dtype):
    x = np.array([[LN_ROWS[row]]], dtype=dtype)
    gamma, beta = np.full(4, 2.0, dtype=dtype), np.full(4, 0.5, dtype=dtype)
    out, cache = finite_and_quiet(layernorm_forward, x, gamma, beta)
    dout = np.arange(4, dtype=dtype).reshape(1, 1, 4)
    dx, dgamma, dbeta = finite_and_quiet(layernorm_backward, dout, cache)
    assert out.dtype == dx.dtype == dtype and all_finite(out, dx, dgamma, dbeta)
    if row in ("constant", "tiny"):  # nothing to normalise: the output is beta
        np.testing.assert_allclose(out[0, 0], beta, atol=1e-6)
    else:  # normalised: mean beta, standard deviation |gamma| (up to eps)
        np.testing.assert_allclose(out.mean(), 0.5, atol=1e-3)
        np.testing.assert_allclose(out.std(), 2.0, rtol=1e-3)
    np.testing.assert_allclose(dx.sum(), 0.0, atol=1e-3)  # shifting x changes nothing


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_extreme_logits(dtype):
    logits = np.array([[EXTREME_ROWS["+-1e4"], EXTREME_ROWS["constant"],
                        EXTREME_ROWS["one -inf"]]], dtype=dtype)
    targets = np.array([[1, 2, 3]])  # the -1e4 entry, any entry, the -1e4 entry
    loss, cache = finite_and_quiet(cross_entropy_forward, logits, targets)
    dlogits = finite_and_quiet(cross_entropy_backward, cache)
    assert dlogits.dtype == dtype and all_finite(loss, dlogits)
    # -log softmax: 2e4 (the target is 2e4 below the max), log 4, 2e4
    np.testing.assert_allclose(loss, (2e4 + np.log(4) + 2e4) / 3, rtol=1e-6)
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, atol=1e-6)  # rows of p - onehot


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_ignores_an_all_minus_inf_padding_row(dtype):
    logits = np.array([[[1.0, 2.0, 3.0, 4.0], EXTREME_ROWS["all -inf"]]], dtype=dtype)
    targets = np.array([[3, -100]])  # the second position is padding
    loss, cache = finite_and_quiet(cross_entropy_forward, logits, targets, -100)
    dlogits = finite_and_quiet(cross_entropy_backward, cache)
    assert all_finite(loss, dlogits)
    expected = -log_softmax(np.array([1.0, 2.0, 3.0, 4.0]))[3]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert not dlogits[0, 1].any()  # the padding row gets no gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_of_an_all_minus_inf_row_is_minus_inf_not_nan(dtype):
    out = finite_and_quiet(log_softmax, np.array([[-np.inf] * 3, [0.0, 0.0, -np.inf]],
                                                 dtype=dtype))
    assert out.dtype == dtype
    assert np.isneginf(out[0]).all()
    np.testing.assert_allclose(out[1], [np.log(0.5), np.log(0.5), -np.inf])
