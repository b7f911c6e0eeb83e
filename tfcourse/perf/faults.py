"""Chapter 12: failures at scale, and how often to checkpoint (Young 1974; Daly 2006).

A synchronous training job stops when any one of its n devices fails, so its mean time
between failures is a device's divided by n. Checkpointing every `interval` seconds of work,
at a cost of `checkpoint_s` seconds each, a failure loses the work done since the last
checkpoint (half an interval on average) plus `restart_s` to start again. Per second of work,
to first order in interval / MTBF:

    waste(interval) = checkpoint_s / interval + (interval / 2 + restart_s) / mtbf

which is smallest at Young's interval sqrt(2 checkpoint_s mtbf). `simulate_run` plays the
same job with random (exponential) failures, the check that the first-order formula needs.
"""

from __future__ import annotations

import math

import numpy as np

from tfcourse.nn.validate import require_nonnegative_real, require_positive_int, require_real

# Llama 3 (Dubey et al. 2024, section 3.3.4): 466 job interruptions in a 54-day snapshot of
# pre-training on 16,384 H100 GPUs, 419 of them unexpected (78 % hardware).
LLAMA3_FAILURES = {"gpus": 16_384, "days": 54, "unexpected_interruptions": 419}


def _positive(name: str, value) -> float:
    return require_real(name, value, positive=True)


def job_mtbf(device_mtbf_s: float, n_devices: int) -> float:
    """Mean seconds between failures of a job that stops when any of its devices fails."""
    return _positive("device_mtbf_s", device_mtbf_s) / require_positive_int("n_devices",
                                                                           n_devices)


def young_interval(checkpoint_s: float, mtbf_s: float) -> float:
    """Seconds of work between checkpoints that minimise `expected_waste`: sqrt(2 C M)."""
    return math.sqrt(2 * _positive("checkpoint_s", checkpoint_s) * _positive("mtbf_s", mtbf_s))


def expected_waste(interval_s: float, checkpoint_s: float, mtbf_s: float,
                   restart_s: float = 0.0) -> float:
    """First-order fraction of extra time per second of work: saving, lost work, restarts."""
    interval_s, mtbf_s = _positive("interval_s", interval_s), _positive("mtbf_s", mtbf_s)
    return (require_nonnegative_real("checkpoint_s", checkpoint_s) / interval_s
            + (interval_s / 2 + require_nonnegative_real("restart_s", restart_s)) / mtbf_s)


def simulate_run(work_s: float, interval_s: float, checkpoint_s: float, mtbf_s: float,
                 restart_s: float = 0.0, seed: int = 0) -> float:
    """Wall-clock seconds to finish `work_s` seconds of training that checkpoints after every
    `interval_s` of work (not after the last piece), with failures at exponential random
    times of mean `mtbf_s` (none while restarting); each failure resumes from the last
    checkpoint after `restart_s`."""
    work_s, interval_s = _positive("work_s", work_s), _positive("interval_s", interval_s)
    mtbf_s = _positive("mtbf_s", mtbf_s)
    checkpoint_s, restart_s = (require_nonnegative_real("checkpoint_s", checkpoint_s),
                               require_nonnegative_real("restart_s", restart_s))
    rng = np.random.default_rng(seed)
    wall, done = 0.0, 0.0
    while done < work_s:
        piece = min(interval_s, work_s - done)
        needed = piece + (checkpoint_s if done + piece < work_s else 0.0)
        failure = rng.exponential(mtbf_s)
        if failure >= needed:
            wall, done = wall + needed, done + piece
        else:  # the piece and its unfinished checkpoint are lost
            wall += failure + restart_s
    return wall
