"""Issue 23 item 3's tools: learning-rate scaling rules, the gradient noise scale from two
batch sizes (which data parallelism records every step), and stale-gradient training."""

import dataclasses
import math

import numpy as np
import pytest

from tfcourse import data, train
from tfcourse.course.launch import run_mpi
from tfcourse.nn import model
from tfcourse.nn.optim import adamw_init, sum_of_squares
from tfcourse.parallel.plans.batches import batch_rows
from tfcourse.perf import costmodel


def test_learning_rate_rules_by_hand():
    assert train.scaled_lr(0.01, 16, 64, "constant") == 0.01
    assert train.scaled_lr(0.01, 16, 64, "linear") == pytest.approx(0.04)
    assert train.scaled_lr(0.01, 16, 64, "sqrt") == pytest.approx(0.02)
    assert train.scaled_lr(0.01, 16, 8, "linear") == pytest.approx(0.005)
    with pytest.raises(ValueError, match=r"rule: expected one of \['constant', 'linear', "
                                         r"'sqrt'\], got 'cubic'"):
        train.scaled_lr(0.01, 16, 64, "cubic")


def test_noise_scale_by_hand():
    # |G|^2 = 1, tr(Sigma) = 8: E|G_2|^2 = 1 + 4 = 5, E|G_8|^2 = 1 + 1 = 2
    got = costmodel.gradient_noise_scale(5.0, 2.0, 2, 8)
    assert got["true_sq_norm"] == pytest.approx(1.0) and got["trace"] == pytest.approx(8.0)
    assert got["noise_scale"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match=r"b_small, b_big: expected 0 < b_small < b_big"):
        costmodel.gradient_noise_scale(1.0, 1.0, 8, 8)


def test_noise_scale_recovers_a_known_gradient_distribution():
    """Per-example gradients G + noise with known |G|^2 and tr(Sigma): averaged over many
    draws, the estimator finds both (it is unbiased)."""
    rng = np.random.default_rng(0)
    true = rng.standard_normal(50)
    scales = rng.uniform(0.5, 3.0, 50)  # per-coordinate noise: tr(Sigma) = sum scales^2
    small_sq, big_sq = [], []
    for _ in range(4000):
        examples = true + scales * rng.standard_normal((32, 50))
        small_sq.append(np.sum(examples[:4].mean(axis=0) ** 2))
        big_sq.append(np.sum(examples.mean(axis=0) ** 2))
    got = costmodel.gradient_noise_scale(np.mean(small_sq), np.mean(big_sq), 4, 32)
    assert got["true_sq_norm"] == pytest.approx(np.sum(true**2), rel=0.1)
    assert got["trace"] == pytest.approx(np.sum(scales**2), rel=0.03)


SETTINGS = dataclasses.replace(train.TRAIN_PRESETS["tiny"], steps=3)


def test_stale_gradients_are_applied_k_steps_late():
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size)
    plain = train.train_lm(config, corpus, SETTINGS, progress="none")
    assert train.train_lm(config, corpus, SETTINGS, progress="none",
                          staleness=0)["losses"] == plain["losses"]
    two = dataclasses.replace(SETTINGS, steps=2)  # the schedule depends on the steps
    stale = train.train_lm(config, corpus, two, progress="none", staleness=1)
    # by hand: step 0 computes g0 and waits; step 1 computes g1 (on the same, unchanged
    # parameters, so its loss is step 0's on batch 1) and applies g0
    params = model.init_params(config, SETTINGS.seed)
    x0, y0 = data.lm_batch(corpus.ids, 16, 32, SETTINGS.seed, 0)
    x1, y1 = data.lm_batch(corpus.ids, 16, 32, SETTINGS.seed, 1)
    _, g0 = model.loss_and_grads(params, x0, y0, config)
    loss1, _ = model.loss_and_grads(params, x1, y1, config)
    expected, _, _ = train.optimizer_update(params, g0, adamw_init(params), two, 1)
    assert stale["losses"][1] == pytest.approx(loss1, abs=1e-12)
    assert all(np.allclose(stale["params"][n], expected[n], atol=1e-14) for n in expected)
    with pytest.raises(ValueError, match=r"staleness: the asynchronous simulation trains in "
                                         r"fp32"):
        train.train_lm(config, corpus, SETTINGS, progress="none", staleness=1,
                       checkpoint="/tmp/never")


@pytest.mark.mpi
@pytest.mark.parametrize("zero", ["0", "1"])
def test_data_parallel_records_each_ranks_and_the_global_gradient_norm(zero):
    """Step 0 on 3 ranks: each rank's |G|^2 is the serial model's gradient of its rows, the
    global one the whole batch's - independent serial computations."""
    corpus = train.load_corpus()
    config = model.preset("tiny", corpus.vocab.size)
    result = run_mpi("tfcourse.parallel.data_parallel", ["--steps", "2", "--zero", zero],
                     n_ranks=3, timeout=120).result
    norms = result["grad_sq_norms_per_rank"]
    params = model.init_params(config, 0)
    x, y = data.lm_batch(corpus.ids, 16, 32, 0, 0)
    whole = sum_of_squares(model.loss_and_grads(params, x, y, config)[1])
    for rank in range(3):
        lo, hi = batch_rows(16, rank, 3)
        mine = sum_of_squares(model.loss_and_grads(params, x[lo:hi], y[lo:hi], config)[1])
        local, global_ = norms[rank][0]
        assert local == pytest.approx(mine, rel=1e-10) and global_ == pytest.approx(whole,
                                                                                   rel=1e-10)
    estimate = costmodel.gradient_noise_scale(norms[0][0][0], norms[0][0][1], 5 * 32, 16 * 32)
    assert math.isfinite(estimate["trace"])
