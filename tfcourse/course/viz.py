"""Plots shared by the chapters (matplotlib, rendered as PNG in the notebooks)."""

from __future__ import annotations

import numpy as np

from tfcourse.perf.hardware import attainable_gflops, ridge_intensity


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


def plot_heatmap(matrix, ax=None, title=None, xlabel=None, ylabel=None, xticklabels=None,
                 yticklabels=None, cmap="viridis", vmin=None, vmax=None, colorbar=True):
    """Draw a 2-D array as an image with optional tick labels; returns the Axes."""
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"matrix: expected a 2-D array, got shape {matrix.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for labels, set_ticks, set_labels in ((xticklabels, ax.set_xticks, ax.set_xticklabels),
                                          (yticklabels, ax.set_yticks, ax.set_yticklabels)):
        if labels is not None:
            set_ticks(range(len(labels)))
            set_labels(labels)
    ax.set_title(title or "")
    ax.set_xlabel(xlabel or "")
    ax.set_ylabel(ylabel or "")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_attention(weights, ax=None, title="attention weights", tokens=None, colorbar=True):
    """Heatmap of attention weights (n_q, n_k): row = query, column = key, colour in [0, 1]."""
    return plot_heatmap(weights, ax=ax, title=title, xlabel="key position",
                        ylabel="query position", xticklabels=tokens, yticklabels=tokens,
                        vmin=0.0, vmax=1.0, colorbar=colorbar)


PIPELINE_COLOURS = {"forward": "tab:blue", "backward": "tab:orange", "weight": "tab:green",
                    "send": "0.6", "recv": "0.8", "wait": "mistyrose", "sync": "lavender",
                    "allreduce": "0.4"}
PIPELINE_COMPUTE = ("forward", "backward", "weight")


def plot_gantt(rows, row_labels, ax=None, title="", xlabel="time", legend=None):
    """Bars on horizontal rows: rows[r] is a list of (start, end, text, colour, tall).
    `legend` maps labels to colours. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.6 + 0.55 * len(rows)))
    for r, bars in enumerate(rows):
        for start, end, text, colour, tall in bars:
            height = 0.8 if tall else 0.3
            ax.barh(r, end - start, left=start, height=height, color=colour, edgecolor="white",
                    linewidth=0.5)
            if text and end > start:
                ax.text((start + end) / 2, r, text, ha="center", va="center", fontsize=7,
                        color="white")
    ax.set_yticks(range(len(rows)), row_labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left", fontsize="medium")
    if legend:  # above the bars, right of the title, so it never hides a bar
        ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items()],
                  loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="x-small",
                  ncol=len(legend), frameon=False, borderaxespad=0.2)
    return ax


def plot_pipeline_timeline(events_per_rank, ax=None, title="pipeline timeline", unit="ms",
                           scale=1e3):
    """Gantt chart: one row per rank (rank 0 on top), one bar per recorded event, labelled
    with its micro-batch; when the ranks run several model chunks (interleaved), a later
    chunk's bars are lighter. Gaps are idle time. `scale` converts event times to `unit`."""
    from matplotlib.colors import to_rgb

    chunks = 1 + max((e.get("chunk", 0) for events in events_per_rank for e in events),
                     default=0)

    def colour(e):
        lighter = 0.5 * e.get("chunk", 0) / max(chunks - 1, 1)  # towards white
        return tuple(c + (1.0 - c) * lighter for c in to_rgb(PIPELINE_COLOURS[e["kind"]]))

    rows = [[(e["start"] * scale, e["end"] * scale,
              str(e["microbatch"]) if e["kind"] in PIPELINE_COMPUTE else "", colour(e),
              e["kind"] in PIPELINE_COMPUTE) for e in events] for events in events_per_rank]
    kinds = sorted({e["kind"] for events in events_per_rank for e in events},
                   key=list(PIPELINE_COLOURS).index)
    return plot_gantt(rows, [f"rank {r}" for r in range(len(rows))], ax=ax, title=title,
                      xlabel=unit, legend={k: PIPELINE_COLOURS[k] for k in kinds})


def plot_task_timeline(timeline, workers, ax=None, title="tasks per worker", scale=1.0,
                       unit="seconds"):
    """Gantt chart of tasks: one row per worker, one bar per task labelled with its id."""
    rows = [[(e["start"] * scale, e["end"] * scale, str(e["id"]), f"C{e['id'] % 10}", True)
             for e in timeline if e["worker"] == w] for w in workers]
    return plot_gantt(rows, [f"worker {w}" for w in workers], ax=ax, title=title, xlabel=unit)


STEP_PART_COLOURS = {"compute": "tab:blue", "communication": "tab:red", "waiting": "0.75"}


def plot_step_parts(seconds_per_rank: list[dict], ax=None, title="", scale=1e3, unit="ms"):
    """Stacked bars, one per rank: the seconds of a step spent computing, communicating and
    waiting (the dicts of program.StepTimes.mean). Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 2.8))
    ranks = range(len(seconds_per_rank))
    bottom = [0.0 for _ in ranks]
    for part, colour in STEP_PART_COLOURS.items():
        heights = [parts[part] * scale for parts in seconds_per_rank]
        ax.bar(ranks, heights, bottom=bottom, color=colour, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks], fontsize="small")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize="medium")
    return ax
