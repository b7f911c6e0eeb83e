"""Chapter 6: collectives written by hand - ring reduce-scatter, all-gather and all-reduce, and
the naive gather-and-broadcast all-reduce - next to MPI's own, checked and timed.

Only programs started by `mpiexec` import this module (it initialises MPI); notebooks use
`tfcourse.course.launch` instead. Collectives use mpi4py's buffer (uppercase) API on NumPy
arrays, which sends the raw memory without pickling. The program framework (command line,
training loop, timing) is in tfcourse.parallel.program.

    python -m mpi4py -m tfcourse.parallel.comm --check      # ring/naive vs MPI Allreduce
    python -m mpi4py -m tfcourse.parallel.comm --bench      # time them, 1 KB .. 64 MB
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI

from tfcourse.files import write_json_atomic
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.plans.batches import chunk_bounds
from tfcourse.parallel.program import agree_on_arguments, program_parser

# --------------------------------------------------------------------------- all-reduce


def ring_reduce_scatter(buf: np.ndarray, comm: MPI.Comm) -> tuple[int, int]:
    """In place: afterwards chunk (rank + 1) % p of `buf` holds the sum over all ranks.

    p - 1 steps around the ring: at step s rank r sends chunk (r - s) mod p to rank r + 1 and
    adds the chunk (r - s - 1) mod p it receives from rank r - 1 into its own copy.
    Returns the bounds of the chunk this rank now owns fully reduced.
    """
    p, r = comm.size, comm.rank
    bounds = chunk_bounds(buf.size, p)
    right, left = (r + 1) % p, (r - 1) % p
    scratch = np.empty(max(hi - lo for lo, hi in bounds), dtype=buf.dtype)
    for step in range(p - 1):
        send_lo, send_hi = bounds[(r - step) % p]
        recv_lo, recv_hi = bounds[(r - step - 1) % p]
        incoming = scratch[: recv_hi - recv_lo]
        comm.Sendrecv(buf[send_lo:send_hi], dest=right, recvbuf=incoming, source=left)
        buf[recv_lo:recv_hi] += incoming
    return bounds[(r + 1) % p]


def ring_all_gather(buf: np.ndarray, comm: MPI.Comm) -> None:
    """In place: each rank starts owning chunk (rank + 1) % p and ends with every chunk.

    p - 1 steps: at step s rank r forwards chunk (r + 1 - s) mod p to rank r + 1.
    """
    p, r = comm.size, comm.rank
    bounds = chunk_bounds(buf.size, p)
    right, left = (r + 1) % p, (r - 1) % p
    for step in range(p - 1):
        send_lo, send_hi = bounds[(r + 1 - step) % p]
        recv_lo, recv_hi = bounds[(r - step) % p]
        comm.Sendrecv(buf[send_lo:send_hi], dest=right, recvbuf=buf[recv_lo:recv_hi],
                      source=left)


def ring_allreduce(buf: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """Sum `buf` (1-D, contiguous) over all ranks, in place, by reduce-scatter + all-gather.

    Each rank sends 2 (p - 1) / p of the buffer in total, whatever p: the bandwidth-optimal
    all-reduce (Patarasuk and Yuan 2009). Works for any length, including length < p.
    """
    _require_1d_contiguous(buf)
    if comm.size > 1:
        ring_reduce_scatter(buf, comm)
        ring_all_gather(buf, comm)
    return buf


def naive_allreduce(buf: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """Sum `buf` over all ranks, in place: gather every buffer to rank 0, add, broadcast.

    Rank 0 receives and sends p - 1 whole buffers: its link is the bottleneck.
    """
    _require_1d_contiguous(buf)
    gathered = np.empty((comm.size, buf.size), dtype=buf.dtype) if comm.rank == 0 else None
    comm.Gather(buf, gathered, root=0)
    if comm.rank == 0:
        np.sum(gathered, axis=0, out=buf)
    comm.Bcast(buf, root=0)
    return buf


def mpi_allreduce(buf: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """Sum `buf` over all ranks, in place, with the MPI library's own Allreduce."""
    _require_1d_contiguous(buf)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


ALLREDUCES = {"mpi": mpi_allreduce, "ring": ring_allreduce, "naive": naive_allreduce}


def _require_1d_contiguous(buf) -> None:
    if not isinstance(buf, np.ndarray) or buf.ndim != 1 or not buf.flags.c_contiguous:
        got = getattr(buf, "shape", type(buf).__name__)
        raise ValueError(f"buf: expected a contiguous 1-D NumPy array, got {got}")


def check_allreduces(comm: MPI.Comm, lengths=(0, 1, 2, 3, 7, 1000, 1001, 4099)) -> dict:
    """Max relative difference of ring and naive from MPI's Allreduce, per algorithm and dtype,
    over several lengths (including lengths smaller than, and not multiples of, p)."""
    errors = {f"{name}/{np.dtype(t).name}": 0.0 for name in ("ring", "naive")
              for t in (np.float64, np.float32, np.int64)}
    for n in lengths:
        for dtype in (np.float64, np.float32, np.int64):
            rng = np.random.default_rng([comm.rank, n])
            data = (rng.standard_normal(n) * 100).astype(dtype)
            reference = mpi_allreduce(data.copy(), comm).astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
            for name in ("ring", "naive"):
                got = ALLREDUCES[name](data.copy(), comm).astype(np.float64)
                key = f"{name}/{np.dtype(dtype).name}"
                err = float(np.max(np.abs(got - reference), initial=0.0)) / scale
                errors[key] = max(errors[key], err)
    return {"world_size": comm.size, "lengths": list(lengths), "max_rel_error": errors}


def bench_allreduces(comm: MPI.Comm, sizes_bytes, repeats: int = 5) -> dict:
    """Median seconds of each all-reduce for float32 buffers of the given sizes (rank 0's)."""
    timings = {name: [] for name in ALLREDUCES}
    for nbytes in sizes_bytes:
        buf = np.ones(max(1, nbytes // 4), dtype=np.float32)
        for name, fn in ALLREDUCES.items():
            samples = []
            for _ in range(repeats + 1):
                comm.Barrier()
                start = time.perf_counter()
                fn(buf, comm)
                samples.append(time.perf_counter() - start)
            timings[name].append(float(np.median(samples[1:])))
    return {"world_size": comm.size, "sizes_bytes": list(sizes_bytes), "seconds": timings}


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.comm", __doc__, training=False)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare ring/naive with Allreduce")
    mode.add_argument("--bench", action="store_true", help="time the all-reduces")
    parser.add_argument("--max-bytes", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if require_positive_int("--max-bytes", args.max_bytes) < 1024:
        raise ValueError(f"--max-bytes: expected at least 1024 (the smallest size timed), "
                         f"got {args.max_bytes}")
    require_positive_int("--repeats", args.repeats)


def main(argv=None) -> None:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    agree_on_arguments(comm, lambda: check_args(args), args.json)
    if args.check:
        result = check_allreduces(comm)
    else:
        sizes = [2**k for k in range(10, 40) if 2**k <= args.max_bytes]
        result = bench_allreduces(comm, sizes, args.repeats)
    if comm.rank == 0:
        print({k: v for k, v in result.items() if k != "seconds"})
        if args.json:
            write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
