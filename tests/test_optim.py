"""Tests for tfcourse.nn.optim against scalar re-implementations written with plain floats."""

import copy
import math

import numpy as np
import pytest

from tfcourse.nn.optim import (
    adamw_init,
    adamw_step,
    clip_grad_norm,
    decays,
    global_norm,
    sgd_init,
    sgd_step,
)


def tiny_params(dtype=np.float64):
    """A matrix (decayed) and a bias vector (not decayed)."""
    return {
        "blocks.0.w": np.array([[0.5, -1.0], [2.0, 0.25]], dtype=dtype),
        "blocks.0.b": np.array([0.1, -0.3], dtype=dtype),
    }


def tiny_grads(step, dtype=np.float64):
    """Different, deterministic gradients at each step."""
    return {
        "blocks.0.w": np.array([[1.0, -2.0], [0.5, 3.0]], dtype=dtype) * (step + 1),
        "blocks.0.b": np.array([-0.7, 0.2], dtype=dtype) / (step + 1),
    }


def scalar_adamw(p, grads, lr, beta1, beta2, eps, wd):
    """AdamW for one scalar parameter, from the paper's Algorithm 2 with eta_t = lr."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p = p - lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * p)
    return p, m, v


def test_adamw_matches_scalar_reference_over_three_steps():
    lr, betas, eps, wd = 0.1, (0.8, 0.9), 1e-3, 0.5
    params = tiny_params()
    state = adamw_init(params)
    for step in range(3):
        params, state = adamw_step(params, tiny_grads(step), state, lr, betas, eps, wd)
    assert state["step"] == 3 and state["step"].dtype == np.int64

    start = tiny_params()
    for name, p0 in start.items():
        for idx in np.ndindex(p0.shape):
            grads = [float(tiny_grads(s)[name][idx]) for s in range(3)]
            decay = wd if name.endswith(".w") else 0.0  # matrices decay, biases do not
            p, m, v = scalar_adamw(float(p0[idx]), grads, lr, *betas, eps, decay)
            assert params[name][idx] == pytest.approx(p, rel=1e-12)
            assert state[f"m.{name}"][idx] == pytest.approx(m, rel=1e-12)
            assert state[f"v.{name}"][idx] == pytest.approx(v, rel=1e-12)


def test_sgd_momentum_matches_hand_loop():
    lr, momentum, wd = 0.05, 0.9, 0.1
    params = tiny_params()
    state = sgd_init(params)
    for step in range(3):
        params, state = sgd_step(params, tiny_grads(step), state, lr, momentum, wd)
    assert state["step"] == 3

    start = tiny_params()
    for name, p0 in start.items():
        for idx in np.ndindex(p0.shape):
            p, buf = float(p0[idx]), 0.0
            for step in range(3):
                g = float(tiny_grads(step)[name][idx]) + (wd * p if name.endswith(".w") else 0.0)
                buf = momentum * buf + g
                p -= lr * buf
            assert params[name][idx] == pytest.approx(p, rel=1e-12)
            assert state[f"momentum.{name}"][idx] == pytest.approx(buf, rel=1e-12)


def test_global_norm_and_clipping():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0, 0.0]])}
    assert global_norm(grads) == 5.0

    clipped, norm = clip_grad_norm(grads, max_norm=1.0)
    assert norm == 5.0
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-12)
    for name in grads:  # same direction: every array scaled by the same factor 1/5
        np.testing.assert_allclose(clipped[name], grads[name] / 5.0, rtol=1e-12)

    unchanged, norm = clip_grad_norm(grads, max_norm=10.0)
    assert norm == 5.0
    for name in grads:
        np.testing.assert_array_equal(unchanged[name], grads[name])
        assert unchanged[name] is not grads[name]


def quadratic_grads(params, target):
    """Gradient of 0.5 * sum((p - target)**2) for every parameter."""
    return {name: p - target[name] for name, p in params.items()}


@pytest.mark.parametrize(
    "init, step, kwargs",
    [(sgd_init, sgd_step, {"lr": 0.1, "momentum": 0.5}), (adamw_init, adamw_step, {"lr": 0.05})],
)
def test_optimisers_minimise_a_quadratic(init, step, kwargs):
    target = {"blocks.0.w": np.full((2, 2), 3.0), "blocks.0.b": np.array([-1.0, 2.0])}
    params = tiny_params()
    state = init(params)
    for _ in range(300):
        params, state = step(params, quadratic_grads(params, target), state, **kwargs)
    for name in target:
        np.testing.assert_allclose(params[name], target[name], atol=1e-3)


def test_weight_decay_rule():
    assert decays("blocks.0.w", np.zeros((2, 3)))
    assert decays("tok_emb", np.zeros((5, 4)))
    assert not decays("blocks.0.b", np.zeros(3))
    assert not decays("ln_f.gamma", np.zeros(4))
    # With zero gradients only the decay moves anything, and only the matrix.
    params = tiny_params()
    zeros = {name: np.zeros_like(p) for name, p in params.items()}
    new, _ = adamw_step(params, zeros, adamw_init(params), lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(new["blocks.0.w"], params["blocks.0.w"] * (1 - 0.1 * 0.5))
    np.testing.assert_array_equal(new["blocks.0.b"], params["blocks.0.b"])


@pytest.mark.parametrize("init, step", [(sgd_init, sgd_step), (adamw_init, adamw_step)])
def test_inputs_not_mutated_and_float32_kept(init, step):
    params, grads = tiny_params(np.float32), tiny_grads(0, np.float32)
    state = init(params)
    before = copy.deepcopy((params, grads, state))
    new_params, new_state = step(params, grads, state, 0.1, weight_decay=0.1)
    for original, copied in zip((params, grads, state), before, strict=True):
        assert original.keys() == copied.keys()
        for name in original:
            np.testing.assert_array_equal(original[name], copied[name])
    assert all(p.dtype == np.float32 for p in new_params.values())
    assert all(s.dtype == np.float32 for key, s in new_state.items() if key != "step")
    assert all(s.dtype == np.float32 for key, s in state.items() if key != "step")
    clipped, _ = clip_grad_norm(grads, 0.01)
    assert all(g.dtype == np.float32 for g in clipped.values())


def test_state_layout_is_flat_and_named():
    params = tiny_params()
    assert sorted(adamw_init(params)) == [
        "m.blocks.0.b", "m.blocks.0.w", "step", "v.blocks.0.b", "v.blocks.0.w",
    ]  # fmt: skip
    assert sorted(sgd_init(params)) == ["momentum.blocks.0.b", "momentum.blocks.0.w", "step"]


def bad_call(**overrides):
    params = tiny_params()
    args = {"params": params, "grads": tiny_grads(0), "state": adamw_init(params), "lr": 0.1}
    args.update(overrides)
    adamw_step(**args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grads": {"blocks.0.w": np.zeros((2, 2)), "extra": np.zeros(1)}},
         r"grads: expected the names of params, "
         r"got missing \['blocks.0.b'\] and extra \['extra'\]"),
        ({"grads": {"blocks.0.w": np.zeros((2, 3)), "blocks.0.b": np.zeros(2)}},
         r"grads\['blocks.0.w'\]: expected shape \(2, 2\).*got \(2, 3\)"),
        ({"grads": tiny_grads(0, np.float32)}, r"grads\['blocks.0.w'\]: expected dtype float64"),
        ({"grads": {"blocks.0.w": np.full((2, 2), np.nan), "blocks.0.b": np.zeros(2)}},
         r"grads\['blocks.0.w'\]: expected finite values"),
        ({"state": {"step": np.array(0)}}, r"state: expected the names of adamw_init\(params\)"),
        ({"state": {**adamw_init(tiny_params()), "step": np.array(-1)}}, r"state\['step'\]"),
        ({"lr": 0.0}, r"lr: expected a positive finite number, got 0.0"),
        ({"lr": float("inf")}, r"lr: expected a positive finite number"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]: expected a number in \[0, 1\), got 1.0"),
        ({"betas": 0.9}, r"betas: expected a pair"),
        ({"eps": -1e-8}, r"eps: expected a positive finite number"),
        ({"weight_decay": -0.1}, r"weight_decay: expected a number in \[0, inf\)"),
        ({"params": [1.0]}, r"params: expected a dict of arrays, got list"),
    ],
)  # fmt: skip
def test_validation_names_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        bad_call(**overrides)


def test_sgd_and_clip_validation():
    params = tiny_params()
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\)"):
        sgd_step(params, tiny_grads(0), sgd_init(params), 0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"state: expected the names of sgd_init\(params\)"):
        sgd_step(params, tiny_grads(0), adamw_init(params), 0.1)
    with pytest.raises(ValueError, match=r"max_norm: expected a positive finite number"):
        clip_grad_norm(tiny_grads(0), 0)
    with pytest.raises(ValueError, match=r"grads\['x'\]: expected a real numeric array"):
        global_norm({"x": np.array(["a"])})
