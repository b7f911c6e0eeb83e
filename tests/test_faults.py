"""The checkpoint-interval model (tfcourse.perf.faults) against hand values and against its
own random simulation: the first-order formula is checked, not assumed."""

import math

import numpy as np
import pytest

from tfcourse.perf import faults


def test_llama3_failure_rate_by_hand():
    f = faults.LLAMA3_FAILURES
    hours_between = f["days"] * 24 / f["unexpected_interruptions"]
    assert 3.0 < hours_between < 3.2  # "one failure about every three hours"
    gpu_mtbf_s = hours_between * 3600 * f["gpus"]
    assert faults.job_mtbf(gpu_mtbf_s, f["gpus"]) == pytest.approx(hours_between * 3600)


def test_young_interval_minimises_the_first_order_waste():
    c, m = 60.0, 3 * 3600.0
    best = faults.young_interval(c, m)
    assert best == pytest.approx(math.sqrt(2 * 60 * 10800))
    grid = np.linspace(best / 4, best * 4, 2001)
    waste = [faults.expected_waste(t, c, m) for t in grid]
    assert grid[int(np.argmin(waste))] == pytest.approx(best, rel=0.01)
    assert faults.expected_waste(best, c, m) == pytest.approx(2 * c / best)  # both terms equal


def test_without_failures_the_simulation_pays_only_the_checkpoints():
    wall = faults.simulate_run(1000.0, 100.0, 5.0, mtbf_s=1e15)
    assert wall == pytest.approx(1000.0 + 9 * 5.0)  # no checkpoint after the last piece


def test_simulation_agrees_with_the_formula_and_its_optimum():
    c, m, r, work = 20.0, 4000.0, 30.0, 200_000.0
    best = faults.young_interval(c, m)
    grid = best * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    simulated = [np.mean([faults.simulate_run(work, t, c, m, r, seed) / work - 1
                          for seed in range(20)]) for t in grid]
    predicted = [faults.expected_waste(t, c, m, r) for t in grid]
    assert int(np.argmin(simulated)) == 2  # the simulated optimum is Young's interval
    np.testing.assert_allclose(simulated, predicted, rtol=0.1)  # first order: tau << M


@pytest.mark.parametrize("call, match", [
    (lambda: faults.young_interval(0, 10), "checkpoint_s"),
    (lambda: faults.young_interval(1, float("nan")), "mtbf_s"),
    (lambda: faults.job_mtbf(100.0, 0), "n_devices"),
    (lambda: faults.expected_waste(10, -1, 100), "checkpoint_s"),
    (lambda: faults.simulate_run(100, 0, 1, 100), "interval_s"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
