"""All-reduce of float32 buffers from 1 KB to 64 MB: MPI's Allreduce vs the course's ring
(tfcourse.parallel.comm.ring_allreduce) vs naive gather-and-broadcast, at 2 and 4 ranks.

    python benchmarks/allreduce.py [--max-mb 64] [--ranks 2 4]

Bus bandwidth = 2 (p - 1) / p * size / time: the bytes each rank's link carries in a
bandwidth-optimal all-reduce, per second. On a 2-core machine, 4 ranks oversubscribe the
cores and MPICH's waiting ranks busy-poll: read the 4-rank figures with that in mind.
"""

import argparse

from tfcourse.course.launch import run_mpi
from tfcourse.perf.costmodel import allreduce_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=int, default=64)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for p in args.ranks:
        result = run_mpi("tfcourse.parallel.comm",
                         ["--bench", "--max-bytes", str(args.max_mb * 2**20),
                          "--repeats", str(args.repeats)], n_ranks=p, timeout=600).result
        seconds = result["seconds"]
        print(f"\n{p} ranks: median time (ms) and bus bandwidth (GB/s)")
        print(f"{'size':>9s} " + " ".join(f"{name:>18s}" for name in seconds) + "  ring/mpi")
        for i, size in enumerate(result["sizes_bytes"]):
            cells = []
            for name in seconds:
                t = seconds[name][i]
                cells.append(f"{t * 1e3:8.3f} {allreduce_bytes(size, p) / t / 1e9:8.2f}")
            label = f"{size // 2**20} MB" if size >= 2**20 else f"{size // 2**10} KB"
            ratio = seconds["ring"][i] / seconds["mpi"][i]
            print(f"{label:>9s} " + " ".join(f"{c:>18s}" for c in cells) + f"  {ratio:8.2f}")


if __name__ == "__main__":
    main()
