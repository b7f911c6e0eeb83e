"""What activation recomputation costs and saves: one forward + backward of the model on a
preset's batch with config.recompute none | selective | full, timed (median of --steps after
--warmup) and traced (the bytes the forward pass keeps for the backward, and the step's peak:
tfcourse.perf.memory.step_memory), with the ratios to no recomputation.

    python -m benchmarks.recompute --config small|medium [--threads 1] [--json PATH]

Full recomputation runs every block's forward twice: with a backward that costs about twice a
forward, expect about (1 + 2 + 1)/(1 + 2) = 4/3 of the time. Selective recomputation redoes only
the attention scores and softmax. Quote figures from one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from threadpoolctl import threadpool_limits

from tfcourse.allocator import keep_freed_memory
from tfcourse.nn import model
from tfcourse.perf.measure import lm_setup
from tfcourse.perf.memory import step_memory


def measure(config_name: str, threads: int, steps: int, warmup: int) -> list[dict]:
    keep_freed_memory()
    base, _, params, batches = lm_setup(config_name)
    rows = []
    with threadpool_limits(limits=threads, user_api="blas"):
        for recompute in model.RECOMPUTE:
            config = dataclasses.replace(base, recompute=recompute)
            times = []
            for i in range(warmup + steps):
                x, y = batches[i % len(batches)]
                start = time.perf_counter()
                model.loss_and_grads(params, x, y, config)
                times.append(time.perf_counter() - start)
            memory = step_memory(params, *batches[0], config)
            rows.append({"recompute": recompute, "step_s": statistics.median(times[warmup:]),
                         "kept_bytes": memory["kept"], "peak_bytes": memory["peak"]})
    for row in rows:
        row["time_ratio"] = row["step_s"] / rows[0]["step_s"]
        row["kept_ratio"] = row["kept_bytes"] / rows[0]["kept_bytes"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = measure(args.config, args.threads, args.steps, args.warmup)
    print(f"{'recompute':>10} {'step ms':>9} {'x none':>7} {'kept MiB':>9} {'x none':>7} "
          f"{'peak MiB':>9}")
    for r in rows:
        print(f"{r['recompute']:>10} {r['step_s'] * 1e3:9.1f} {r['time_ratio']:7.2f} "
              f"{r['kept_bytes'] / 2**20:9.2f} {r['kept_ratio']:7.3f} "
              f"{r['peak_bytes'] / 2**20:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
