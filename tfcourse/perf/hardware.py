"""Chapter 0: what this machine can do - matmul peak FLOP/s, memory bandwidth, the roofline.

Later chapters divide achieved FLOP/s by the peak measured here (the fraction of measured
matmul peak; MFU proper divides by a datasheet peak, which a virtual CPU lacks), so the
peak is *measured*, never copied from a datasheet.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from tfcourse.files import write_json_atomic

DEFAULT_RESULTS = Path("results") / "hardware.json"


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of (m, k) @ (k, n): m*n outputs, each k multiplies and k adds."""
    return 2 * m * k * n


def matmul_intensity(n: int, bytes_per_element: int) -> float:
    """Arithmetic intensity (FLOP/byte) of an n x n matmul that reads A, B and writes C once."""
    return matmul_flops(n, n, n) / (3 * n * n * bytes_per_element)


def attainable_gflops(intensity, peak_gflops: float, bandwidth_gbs: float):
    """Roofline: min(peak, bandwidth * intensity) for intensity in FLOP/byte (array ok)."""
    if peak_gflops <= 0 or bandwidth_gbs <= 0:
        raise ValueError(
            f"peak_gflops and bandwidth_gbs: expected positive, got {peak_gflops}, {bandwidth_gbs}"
        )
    return np.minimum(peak_gflops, bandwidth_gbs * np.asarray(intensity, dtype=float))


def ridge_intensity(peak_gflops: float, bandwidth_gbs: float) -> float:
    """Intensity (FLOP/byte) where a kernel stops being memory-bound and becomes compute-bound."""
    return peak_gflops / bandwidth_gbs


def call_times(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds (time.perf_counter) of each of `repeats` calls of fn(), after `warmup`
    untimed calls (first-call costs: page faults, caches, lazy imports)."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls after `warmup` untimed ones, in seconds.

    The minimum is the least noisy estimate on a shared machine: noise only adds time.
    """
    return min(call_times(fn, repeats, warmup))


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() elsewhere). Runs
    with more MPI ranks than this are oversubscribed: correct, but not timings of this machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_threads_available() -> int:
    """How many threads the BLAS library may use now (1 if none is loaded)."""
    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max((lib["num_threads"] for lib in blas), default=1)


def _check_threads(threads: int | None) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected None (all) or an integer >= 1, got {threads!r}")


def measure_matmul_gflops(
    n: int = 1024, dtype=np.float32, threads: int | None = None, repeats: int = 5
) -> float:
    """Best achieved GFLOP/s of an (n, n) @ (n, n) matmul with `threads` BLAS threads."""
    _check_threads(threads)
    if n < 1:
        raise ValueError(f"n: expected a positive matrix size, got {n}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    with threadpool_limits(limits=threads, user_api="blas"):
        seconds = best_time(lambda: np.matmul(a, b, out=out), repeats=repeats)
    return matmul_flops(n, n, n) / seconds / 1e9


def measure_copy_bandwidth_gbs(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best memory bandwidth in GB/s of copying `n_bytes` (counts read + write = 2 * n_bytes).

    This is STREAM's "copy" convention; a CPU that reads the destination line before
    writing it (write-allocate) really moves 3 * n_bytes, so the true bandwidth is higher.
    """
    if n_bytes < 8:
        raise ValueError(f"n_bytes: expected at least 8 bytes, got {n_bytes}")
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    seconds = best_time(lambda: np.copyto(dst, src), repeats=repeats)
    return 2 * src.nbytes / seconds / 1e9


def measure_hardware(n: int = 1024, repeats: int = 5) -> dict:
    """Matmul peak for float32/float64 at 1 and all threads, plus copy bandwidth, as a dict."""
    all_threads = blas_threads_available()
    peaks = {}
    for dtype in (np.float32, np.float64):
        for threads in sorted({1, all_threads}):
            gflops = measure_matmul_gflops(n, dtype, threads, repeats)
            peaks[f"{np.dtype(dtype).name}/{threads}"] = gflops
    return {
        "cpu_count": os.cpu_count(),
        "blas_threads": all_threads,
        "matmul_size": n,
        "peak_gflops": peaks,
        "copy_bandwidth_gbs": measure_copy_bandwidth_gbs(repeats=repeats),
    }


def save_hardware(measured: dict, path: str | os.PathLike = DEFAULT_RESULTS) -> Path:
    """Store the measurements for later chapters (atomically; creates the folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, measured)


REQUIRED_PACKAGES = {
    "numpy": "1.24",
    "matplotlib": "3.7",
    "ipywidgets": "8.0",
    "jupyterlab": "4.0",
    "mpi4py": "4.0",
    "threadpoolctl": "3.1",
    "nbval": "0.11",
}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_environment(required: dict[str, str] = REQUIRED_PACKAGES) -> list[dict]:
    """One row per package: name, minimum version, installed version (or None), ok."""
    rows = []
    for name, minimum in required.items():
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found = None
        ok = found is not None and _version_tuple(found) >= _version_tuple(minimum)
        rows.append({"package": name, "minimum": minimum, "found": found, "ok": ok})
    return rows
