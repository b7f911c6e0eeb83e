"""Tokens/s and MFU of one training step (forward + backward + AdamW) of the NumPy model.

    python benchmarks/train_step.py --config small|medium --threads 1 [--json PATH] [--no-torch]

The peak FLOP/s it divides by is measured in the same run (float32 matmul, same threads).
If PyTorch is installed (`pip install -e .[bench]`), an identical PyTorch model - same
architecture, initial weights, shapes, dtype and threads - is timed in a separate process
(never both in one process: their thread pools fight) and the ratio is printed. Run it on an
otherwise idle machine and quote figures from one run.
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


def time_numpy(config_name: str, threads: int, steps: int, warmup: int) -> dict:
    from tfcourse.perf.measure import time_train_step

    return time_train_step(config_name, threads, steps, warmup)


def time_torch(config_name: str, threads: int, steps: int, warmup: int) -> dict:
    import torch

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
    parser.add_argument("--backend", default="numpy", choices=["numpy", "torch"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend == "torch":
        print(json.dumps(time_torch(args.config, args.threads, args.steps, args.warmup)))
        return

    from tfcourse.perf import costmodel
    from tfcourse.perf.hardware import measure_matmul_gflops

    peak = measure_matmul_gflops(2048, np.float32, args.threads, repeats=5)
    result = time_numpy(args.config, args.threads, args.steps, args.warmup)
    config, tokens = result["config"], result["tokens_per_step"]
    flops_per_token = costmodel.training_flops_per_token(
        config.vocab_size, config.d_model, config.n_layers, config.d_ff, result["seq_len"])
    tokens_per_s = tokens / result["step_s"]
    report = {
        "config": args.config, "threads": args.threads, "tokens_per_step": tokens,
        "flops_per_token": flops_per_token, "peak_gflops": peak,
        "step_ms": result["step_s"] * 1e3, "tokens_per_s": tokens_per_s,
        "achieved_gflops": tokens_per_s * flops_per_token / 1e9,
        "mfu": costmodel.mfu(tokens_per_s, flops_per_token, peak * 1e9),
    }
    print(f"config {args.config}, {args.threads} BLAS thread(s), float32, "
          f"{tokens} tokens per step")
    print(f"peak (float32 2048^3 matmul, same threads): {peak:.1f} GFLOP/s")
    print(f"NumPy: {report['step_ms']:.1f} ms/step, {tokens_per_s:.0f} tokens/s, "
          f"{report['achieved_gflops']:.1f} GFLOP/s, MFU {report['mfu']:.1%}")
    if not args.no_torch:
        torch_result = torch_in_subprocess(args)
        if torch_result is None:
            print("PyTorch not installed: `pip install -e .[bench]` to compare")
        else:
            torch_tps = tokens / torch_result["step_s"]
            same = abs(torch_result["first_loss"] - result["first_loss"]) < 1e-4
            report.update(torch_tokens_per_s=torch_tps,
                          torch_mfu=costmodel.mfu(torch_tps, flops_per_token, peak * 1e9),
                          numpy_over_torch=tokens_per_s / torch_tps,
                          torch_version=torch_result["torch_version"], same_first_loss=same)
            print(f"PyTorch {torch_result['torch_version']}: "
                  f"{torch_result['step_s'] * 1e3:.1f} ms/step, {torch_tps:.0f} tokens/s, "
                  f"MFU {report['torch_mfu']:.1%}")
            print(f"NumPy / PyTorch throughput: {report['numpy_over_torch']:.2f}x "
                  f"(first-step losses agree: {same})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
