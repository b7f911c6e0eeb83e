"""Layers: forward against closed forms / explicit loops, backward against finite differences."""

import math

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from tfcourse.nn import layers

rng = np.random.default_rng(0)


def check_grad(f, x, analytic, tol=1e-7):
    """f: array -> scalar loss; analytic: its gradient at x."""
    assert rel_error(numerical_gradient(f, x), analytic) < tol


def test_linear_forward_and_backward():
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    G = rng.standard_normal((2, 3, 5))
    out, cache = layers.linear_forward(x, w, b)
    expected = np.array([[[sum(x[i, t, k] * w[k, j] for k in range(4)) + b[j] for j in range(5)]
                          for t in range(3)] for i in range(2)])
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    dx, dw, db = layers.linear_backward(G, cache)
    check_grad(lambda a: np.sum(layers.linear_forward(a, w, b)[0] * G), x, dx)
    check_grad(lambda a: np.sum(layers.linear_forward(x, a, b)[0] * G), w, dw)
    check_grad(lambda a: np.sum(layers.linear_forward(x, w, a)[0] * G), b, db)


def test_embedding_repeated_ids_accumulate():
    table = rng.standard_normal((6, 3))
    ids = np.array([[1, 4, 1], [0, 1, 5]])
    out, cache = layers.embedding_forward(ids, table)
    np.testing.assert_array_equal(out[0, 2], table[1])
    G = rng.standard_normal((2, 3, 3))
    dtable = layers.embedding_backward(G, cache)
    np.testing.assert_allclose(dtable[1], G[0, 0] + G[0, 2] + G[1, 1])
    np.testing.assert_array_equal(dtable[2], 0.0)
    check_grad(lambda t: np.sum(layers.embedding_forward(ids, t)[0] * G), table, dtable)


def test_layernorm_forward_matches_formula():
    x = rng.standard_normal((2, 5)) * 3 + 1
    gamma, beta = rng.standard_normal(5), rng.standard_normal(5)
    out, _ = layers.layernorm_forward(x, gamma, beta, eps=1e-5)
    for row in range(2):
        mean = sum(x[row]) / 5
        var = sum((v - mean) ** 2 for v in x[row]) / 5
        expected = [(x[row, j] - mean) / math.sqrt(var + 1e-5) * gamma[j] + beta[j]
                    for j in range(5)]
        np.testing.assert_allclose(out[row], expected, rtol=1e-12)


def test_layernorm_backward():
    x = rng.standard_normal((2, 3, 6))
    gamma, beta = rng.standard_normal(6), rng.standard_normal(6)
    G = rng.standard_normal(x.shape)
    _, cache = layers.layernorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = layers.layernorm_backward(G, cache)
    check_grad(lambda a: np.sum(layers.layernorm_forward(a, gamma, beta)[0] * G), x, dx)
    check_grad(lambda a: np.sum(layers.layernorm_forward(x, a, beta)[0] * G), gamma, dgamma)
    check_grad(lambda a: np.sum(layers.layernorm_forward(x, gamma, a)[0] * G), beta, dbeta)


def test_layernorm_constant_row_stays_finite():
    out, cache = layers.layernorm_forward(np.full((1, 4), 1e4), np.ones(4), np.zeros(4))
    dx, _, _ = layers.layernorm_backward(np.ones((1, 4)), cache)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))


def test_gelu_matches_tanh_formula_and_erf_gelu():
    x = np.linspace(-5, 5, 41)
    out, _ = layers.gelu_forward(x)
    tanh_formula = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
                    for v in x]
    np.testing.assert_allclose(out, tanh_formula, rtol=1e-12, atol=1e-15)
    exact = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]  # the approximation is close
    assert np.max(np.abs(out - exact)) < 1e-3


@pytest.mark.parametrize("name", ["gelu", "relu"])
def test_activation_backward(name):
    forward, backward = layers.ACTIVATIONS[name]
    x = rng.standard_normal((3, 7)) + 0.05  # keep relu away from its kink at 0
    G = rng.standard_normal(x.shape)
    _, cache = forward(x)
    check_grad(lambda a: np.sum(forward(a)[0] * G), x, backward(G, cache))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_ffn_backward(activation):
    d, d_ff = 4, 9
    x = rng.standard_normal((2, 3, d))
    p = {"w1": rng.standard_normal((d, d_ff)), "b1": rng.standard_normal(d_ff),
         "w2": rng.standard_normal((d_ff, d)), "b2": rng.standard_normal(d)}
    G = rng.standard_normal(x.shape)
    _, cache = layers.ffn_forward(x, *p.values(), activation=activation)
    dx, grads = layers.ffn_backward(G, cache)

    def loss_with(name, value):
        q = dict(p, **{name: value})
        return np.sum(layers.ffn_forward(x, *q.values(), activation=activation)[0] * G)

    check_grad(lambda a: np.sum(layers.ffn_forward(a, *p.values(), activation=activation)[0]
                                * G), x, dx)
    for name in p:
        check_grad(lambda a, name=name: loss_with(name, a), p[name], grads[name])


def test_dropout_zero_rate_is_identity_and_seeded_rate_is_reproducible():
    x = rng.standard_normal((50, 40))
    out, cache = layers.dropout_forward(x, 0.0, None)
    assert out is x and layers.dropout_backward(x, cache) is x
    a, cache_a = layers.dropout_forward(x, 0.25, np.random.default_rng(7))
    b, _ = layers.dropout_forward(x, 0.25, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    kept = a != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(a[kept], x[kept] / 0.75)
    np.testing.assert_array_equal(layers.dropout_backward(np.ones_like(x), cache_a) != 0, kept)


@pytest.mark.parametrize("rate, rng_arg, match", [(1.0, np.random.default_rng(0), "rate"),
                                                  (0.5, None, "rng")])
def test_dropout_bad_arguments(rate, rng_arg, match):
    with pytest.raises(ValueError, match=match):
        layers.dropout_forward(np.ones(3), rate, rng_arg)


def test_cross_entropy_matches_explicit_loop_with_ignore_index():
    logits = rng.standard_normal((2, 3, 5))
    targets = np.array([[1, 4, -100], [0, -100, 2]])
    loss, cache = layers.cross_entropy_forward(logits, targets, ignore_index=-100)
    terms = []
    for i in range(2):
        for t in range(3):
            if targets[i, t] != -100:
                z = sum(math.exp(v) for v in logits[i, t])
                terms.append(-math.log(math.exp(logits[i, t, targets[i, t]]) / z))
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    dlogits = layers.cross_entropy_backward(cache)
    np.testing.assert_array_equal(dlogits[0, 2], 0.0)
    check_grad(lambda a: layers.cross_entropy_forward(a, targets, -100)[0], logits, dlogits)


def test_cross_entropy_extreme_logits_and_all_ignored():
    logits = np.array([[1e4, -1e4, 0.0]])
    loss, cache = layers.cross_entropy_forward(logits, np.array([1]))
    assert loss == pytest.approx(2e4)
    assert np.all(np.isfinite(layers.cross_entropy_backward(cache)))
    loss, cache = layers.cross_entropy_forward(logits, np.array([7]), ignore_index=7)
    assert loss == 0.0 and not layers.cross_entropy_backward(cache).any()


@pytest.mark.parametrize("fn, args", [
    (layers.layernorm_forward, (np.ones((2, 4), np.float32), np.ones(4, np.float32),
                                np.zeros(4, np.float32))),
    (layers.gelu_forward, (np.ones((2, 4), np.float32),)),
    (layers.linear_forward, (np.ones((2, 4), np.float32), np.ones((4, 3), np.float32),
                             np.zeros(3, np.float32))),
])
def test_float32_stays_float32(fn, args):
    assert fn(*args)[0].dtype == np.float32
