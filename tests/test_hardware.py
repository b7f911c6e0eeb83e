"""Chapter 0 measurements: formulas against hand counts, measurements against sanity bounds."""

import json

import numpy as np
import pytest

from tfcourse.perf import hardware


def count_matmul_flops_by_loop(m, k, n):
    """Count the multiply-adds of the textbook triple loop, one by one."""
    flops = 0
    for _ in range(m):
        for _ in range(n):
            for _ in range(k):
                flops += 2  # one multiply, one add
    return flops


@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (2, 3, 4), (5, 1, 7), (3, 8, 2)])
def test_matmul_flops_matches_loop_count(m, k, n):
    assert hardware.matmul_flops(m, k, n) == count_matmul_flops_by_loop(m, k, n)


def test_matmul_intensity_by_hand():
    # 1024^3 * 2 FLOPs over 3 * 1024^2 * 4 bytes = 2048 / 12 FLOP/byte
    assert hardware.matmul_intensity(1024, 4) == pytest.approx(2048 / 12)


def test_roofline_is_bandwidth_bound_then_flat():
    peak, bandwidth = 100.0, 20.0
    assert hardware.ridge_intensity(peak, bandwidth) == 5.0
    got = hardware.attainable_gflops([0.5, 5.0, 50.0], peak, bandwidth)
    np.testing.assert_allclose(got, [10.0, 100.0, 100.0])


def test_roofline_rejects_non_positive_peak():
    with pytest.raises(ValueError, match="peak_gflops"):
        hardware.attainable_gflops(1.0, 0.0, 10.0)


def test_best_time_returns_the_minimum():
    durations = iter([5.0, 0.3, 0.1, 0.2])
    clock = {"t": 0.0}

    def fake_work():
        clock["t"] += next(durations)

    real = hardware.time.perf_counter
    try:
        hardware.time.perf_counter = lambda: clock["t"]
        assert hardware.best_time(fake_work, repeats=3, warmup=1) == pytest.approx(0.1)
    finally:
        hardware.time.perf_counter = real


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_measured_matmul_rate_is_plausible(dtype):
    gflops = hardware.measure_matmul_gflops(n=128, dtype=dtype, threads=1, repeats=2)
    # A unit slip (MFLOP/s vs GFLOP/s, or 2n^3 vs n^3 by 1000x) lands outside this range.
    assert 0.05 < gflops < 5000


def test_measured_bandwidth_is_plausible():
    assert 0.1 < hardware.measure_copy_bandwidth_gbs(n_bytes=8 * 2**20, repeats=2) < 2000


@pytest.mark.parametrize("threads", [0, -1, 1.5])
def test_bad_threads_are_named(threads):
    with pytest.raises(ValueError, match="threads"):
        hardware.measure_matmul_gflops(n=8, threads=threads)


def test_measure_and_save_round_trip(tmp_path):
    measured = hardware.measure_hardware(n=64, repeats=1)
    assert set(measured["peak_gflops"]) >= {"float32/1", "float64/1"}
    path = hardware.save_hardware(measured, tmp_path / "sub" / "hardware.json")
    assert json.loads(path.read_text()) == measured


def test_environment_check_finds_installed_and_missing_packages():
    rows = hardware.check_environment({"numpy": "1.0", "surely-not-installed-pkg": "1.0"})
    assert rows[0]["ok"] and rows[0]["found"] == np.__version__
    assert rows[1] == {"package": "surely-not-installed-pkg", "minimum": "1.0",
                       "found": None, "ok": False}


def test_environment_check_compares_versions_numerically():
    rows = hardware.check_environment({"numpy": "1.999"})
    major = int(np.__version__.split(".")[0])
    assert rows[0]["ok"] == (major >= 2)


def test_cores_available_is_at_most_the_machine_s_cores():
    import os

    from tfcourse.perf.hardware import cores_available

    assert 1 <= cores_available() <= (os.cpu_count() or 1)
