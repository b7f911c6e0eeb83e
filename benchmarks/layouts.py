"""Chapter 12's study from the command line: every parallel layout on this machine, and the
planner's predicted step time against the measured one.

    python -m benchmarks.layouts [--config small] [--steps 10] [--seq-len 64]

Runs one MPI job at a time (see tfcourse.parallel.study); run it on an idle machine - the
timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from tfcourse.nn.model import PRESETS
from tfcourse.parallel.study import (
    compare_with_planner,
    default_layouts,
    format_comparison,
    format_table,
    measure_links,
    run_study,
    summarise,
)
from tfcourse.perf.hardware import measure_matmul_gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-ranks", type=int, default=4)
    args = parser.parse_args()
    training = ["--config", args.config, "--dtype", "float32", "--seq-len", str(args.seq_len),
                "--batch-size", "16", "--steps", str(args.steps)]
    layouts = default_layouts(args.max_ranks, PRESETS[args.config]["n_heads"])
    results = run_study(layouts, training)
    print(format_table(summarise(results)))
    peak = measure_matmul_gflops(1024, np.float32, threads=1) * 1e9
    alpha, beta = measure_links()
    print(f"\npeak {peak / 1e9:.0f} GFLOP/s per core, alpha {alpha * 1e6:.1f} us, "
          f"1/beta {1 / beta / 1e9:.1f} GB/s, {os.cpu_count()} cores")
    print(format_comparison(compare_with_planner(results, peak, alpha, beta, os.cpu_count(),
                                                 24 * 2**30)))


if __name__ == "__main__":
    main()
