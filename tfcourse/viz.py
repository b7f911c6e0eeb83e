"""Plots shared by the chapters (matplotlib, rendered as PNG in the notebooks)."""

from __future__ import annotations

import numpy as np

from tfcourse.hardware import attainable_gflops, ridge_intensity


def plot_roofline(peak_gflops: float, bandwidth_gbs: float, points=(), ax=None, title=None):
    """Log-log roofline: attainable GFLOP/s vs arithmetic intensity (FLOP/byte).

    `points` is an iterable of (label, intensity, achieved_gflops) drawn as markers.
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    ridge = ridge_intensity(peak_gflops, bandwidth_gbs)
    intensity = np.logspace(-2, 3, 200)
    ax.loglog(intensity, attainable_gflops(intensity, peak_gflops, bandwidth_gbs), "k-", lw=2)
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak_gflops / 20), rotation=90,
                ha="right", va="center", color="grey")
    for label, point_intensity, achieved in points:
        ax.loglog([point_intensity], [achieved], "o", label=label)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or f"roofline: peak {peak_gflops:.0f} GFLOP/s, {bandwidth_gbs:.0f} GB/s")
    if points:
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    return ax
