"""Tokens/s and fraction of measured matmul peak of one training step (forward + backward +
AdamW) of the NumPy model, against the identical PyTorch model, in one table.

    python benchmarks/train_step.py --config small|medium --threads 2 [--json PATH] [--no-torch]
                                    [--no-dp]

Rows, each timed in the same run on the same machine:
  NumPy, BLAS threads     one model step, BLAS runs its matmuls on --threads threads
  NumPy, batch threads    --threads Python threads, each a block of the batch with one BLAS
                          thread (tfcourse.threaded); only when --threads > 1
  NumPy, DP ranks         --threads one-thread data-parallel MPI ranks (tfcourse.parallel.
                          data_parallel, the same preset); only when --threads > 1
  PyTorch                 the same model in PyTorch with --threads intra-op threads
Every process keeps freed memory the same way (tfcourse.allocator), PyTorch's included. The
"%peak" column divides the model's FLOP/s by the float32 matmul peak measured in the same
run with the same threads (chapter 5: an upper bound on MFU, which divides by a datasheet
peak). PyTorch is
timed in its own process (never both in one: their thread pools fight). Quote figures from one
run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def time_numpy(config_name: str, threads: int, steps: int, warmup: int,
               split: str = "blas") -> dict:
    from tfcourse.perf.measure import time_train_step

    return time_train_step(config_name, threads, steps, warmup, split=split)


def time_torch(config_name: str, threads: int, steps: int, warmup: int) -> dict:
    import torch

    from tfcourse.allocator import keep_freed_memory

    keep_freed_memory()  # the same malloc settings as the NumPy side
    from benchmarks.torch_model import TorchLM, make_step

    torch.set_num_threads(threads)
    from tfcourse.perf.measure import lm_setup

    config, settings, params, batches = lm_setup(config_name)
    step = make_step(TorchLM(params, config), settings.lr, settings.clip)
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    times, losses = [], []
    for i in range(warmup + steps):
        x, y = tensors[i % len(tensors)]
        start = time.perf_counter()
        losses.append(step(x, y))
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "first_loss": losses[0],
            "torch_version": torch.__version__}


def torch_in_subprocess(args) -> dict | None:
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None
    except ImportError:
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--backend", "torch",
           "--config", args.config, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, timeout=600)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=["tiny", "small", "medium"],
                        help="medium: d_model 256, 4 layers, context 256, batch 8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-dp", action="store_true", help="skip the MPI data-parallel row")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "torch"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend == "torch":
        print(json.dumps(time_torch(args.config, args.threads, args.steps, args.warmup)))
        return

    from tfcourse.perf import costmodel
    from tfcourse.perf.hardware import measure_matmul_gflops

    peak = measure_matmul_gflops(2048, np.float32, args.threads, repeats=5)
    rows = {f"NumPy, {args.threads} BLAS thread(s)":
            time_numpy(args.config, args.threads, args.steps, args.warmup)}
    result = next(iter(rows.values()))
    config, tokens = result["config"], result["tokens_per_step"]
    if args.threads > 1:
        rows[f"NumPy, {args.threads} batch threads x 1 BLAS"] = time_numpy(
            args.config, args.threads, args.steps, args.warmup, split="batch")
        if not args.no_dp:
            rows[f"NumPy, {args.threads} DP ranks x 1 BLAS (MPI)"] = time_dp(args)
    if not args.no_torch:
        torch_result = torch_in_subprocess(args)
        if torch_result is None:
            print("PyTorch not installed: `pip install -e .[bench]` to compare")
        else:
            same = abs(torch_result["first_loss"] - result["first_loss"]) < 1e-4
            rows[f"PyTorch {torch_result['torch_version']}, {args.threads} thread(s)"] = {
                **torch_result, "same_first_loss": same}
    # the peak again after the runs, keeping the higher: a noisy neighbour during one
    # measurement must not inflate every %peak
    peak = max(peak, measure_matmul_gflops(2048, np.float32, args.threads, repeats=5))
    flops_per_token = costmodel.training_flops_per_token(
        config.vocab_size, config.d_model, config.n_layers, config.d_ff, result["seq_len"])
    torch_tps = next((tokens / r["step_s"] for name, r in rows.items()
                      if name.startswith("PyTorch")), None)
    report = {"config": args.config, "threads": args.threads, "tokens_per_step": tokens,
              "flops_per_token": flops_per_token, "peak_gflops": peak, "rows": {}}
    print(f"config {args.config}, float32, {tokens} tokens per step, {args.threads} thread(s); "
          f"peak (float32 2048^3 matmul, same threads) {peak:.1f} GFLOP/s")
    print(f"{'':44s} {'ms/step':>8s} {'tokens/s':>9s} {'%peak':>6s} {'/ PyTorch':>9s}")
    for name, r in rows.items():
        tps = tokens / r["step_s"]
        row = {"step_ms": r["step_s"] * 1e3, "tokens_per_s": tps,
               "peak_fraction": costmodel.mfu(tps, flops_per_token, peak * 1e9),
               "over_torch": tps / torch_tps if torch_tps else None}
        report["rows"][name] = row
        ratio = f"{row['over_torch']:.2f}x" if torch_tps else "-"
        print(f"{name:44s} {row['step_ms']:8.1f} {tps:9.0f} {row['peak_fraction']:6.1%} "
              f"{ratio:>9s}")
    if torch_tps:
        print(f"first-step losses of NumPy and PyTorch agree: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def time_dp(args) -> dict:
    """Median step seconds of data_parallel with --threads one-thread ranks on the preset."""
    from tfcourse.course.launch import run_mpi
    from tfcourse.train import TRAIN_PRESETS

    steps = args.warmup + args.steps
    run = run_mpi("tfcourse.parallel.data_parallel",
                  ["--config", args.config, "--dtype", "float32", "--threads", "1",
                   "--steps", str(steps)], n_ranks=args.threads, timeout=600)
    assert run.result["settings"]["batch_size"] == TRAIN_PRESETS[args.config].batch_size
    return {"step_s": statistics.median(run.result["step_seconds"][args.warmup:])}


if __name__ == "__main__":
    main()
