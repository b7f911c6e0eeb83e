"""Rank-side communication helpers shared by every MPI program of the course (chapters 6-9).

Only programs started by `mpiexec` import this module (it initialises MPI); notebooks use
`tfcourse.course.launch` instead. Collectives use mpi4py's buffer (uppercase) API on NumPy arrays,
which sends the raw memory without pickling.

    python -m mpi4py -m tfcourse.parallel.comm --check      # ring/naive vs MPI Allreduce
    python -m mpi4py -m tfcourse.parallel.comm --bench      # time them, 1 KB .. 64 MB
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from tfcourse.files import check_writable, write_json_atomic
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel.partition import chunk_bounds
from tfcourse.train import add_training_arguments

T = TypeVar("T")


def print_in_rank_order(comm: MPI.Comm, line: str) -> list[str] | None:
    """Gather one line per rank to rank 0 and print them there, ordered by rank.

    MPICH interleaves ranks' direct prints mid-line; printing only on rank 0 keeps the
    output deterministic. Returns the lines on rank 0, None elsewhere.
    """
    lines = comm.gather(line, root=0)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    return lines


def program_parser(module: str, description: str, training: bool = True
                   ) -> argparse.ArgumentParser:
    """The command line of `python -m <module>`: its docstring as help, and (`training`) the
    options every training program shares, with --threads."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if training:
        add_training_arguments(parser, threads=True)
    return parser


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """The `--json PATH` option every MPI program offers (rank 0 writes it atomically)."""
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="write the result as JSON (rank 0 only)"
    )


def add_split_waiting_argument(parser: argparse.ArgumentParser) -> None:
    """`--split-waiting`: time waiting for other ranks apart from communication (CommLog)."""
    parser.add_argument("--split-waiting", action="store_true",
                        help="enter a Barrier before each collective and time it as waiting")


def agree_on_arguments(comm: MPI.Comm, prepare: Callable[[], T],
                       json_path: str | None = None) -> T:
    """Run `prepare()` - which checks the command line and raises ValueError on bad input -
    on every rank, BEFORE any training collective; returns what `prepare()` returns.

    Rank 0 also checks that the --json file can be written, so a typo in its folder fails in
    a second, not after the whole run. The ranks then exchange their verdicts (one
    allgather that every rank reaches), so all fail the same way even if only one rank saw
    the problem (a file missing on one node): the lowest failing rank prints "error: ..."
    to stderr, every rank waits for that line, and all exit with status 2 - under
    `python -m mpi4py` that is an MPI_Abort, which ends the job at once. Nothing is written.
    """
    result, error = None, None
    try:
        result = prepare()
        if comm.rank == 0 and json_path:
            check_writable("--json", json_path)
    except ValueError as err:
        error = str(err)
    errors = comm.allgather(error)
    failed = [rank for rank, message in enumerate(errors) if message is not None]
    if not failed:
        return result
    if comm.rank == failed[0]:
        print(f"error: {errors[failed[0]]}", file=sys.stderr, flush=True)
    comm.Barrier()  # no rank may abort the job before the message is out
    sys.exit(2)


def run_program(args: argparse.Namespace, prepare, run, summary) -> int:
    """The shape of every training program: check the arguments on all ranks
    (`prepare(args, world_size)`, see agree_on_arguments), cap BLAS threads, `run(args, setup,
    comm) -> result`, then on rank 0 print `summary(result)` and write --json atomically."""
    comm = MPI.COMM_WORLD
    setup = agree_on_arguments(comm, lambda: prepare(args, comm.size), args.json)
    with limit_blas_threads(args.threads):
        result = run(args, setup, comm)
    if comm.rank == 0:
        print(summary(result), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return 0


def limit_blas_threads(threads: int = 1):
    """Cap this rank's BLAS threads (ranks sharing cores must not oversubscribe them).

    Returns the threadpoolctl limit: use it as a context manager (`with`), or keep a
    reference for the life of the program."""
    return threadpool_limits(limits=threads, user_api="blas")


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


# --------------------------------------------------------------------------- timing

WAITING = "waiting"


@dataclasses.dataclass
class CommLog:
    """Bytes and seconds of every collective a rank ran, for the notebooks' plots.

    A collective's time mixes two things: waiting for the slowest rank to arrive, and moving
    the data. With `split_waiting`, `timed` first enters a Barrier and records its time as a
    separate "waiting" record (0 bytes), so the collective's own record is the transfer alone.
    The extra Barrier costs one latency per collective; chapter 9's study turns it on.
    """

    records: list = dataclasses.field(default_factory=list)
    split_waiting: bool = False

    def timed(self, name: str, fn, buf: np.ndarray, comm: MPI.Comm):
        if self.split_waiting:
            start = time.perf_counter()
            comm.Barrier()
            self.records.append((WAITING, 0, time.perf_counter() - start))
        start = time.perf_counter()
        result = fn(buf, comm)
        self.records.append((name, int(buf.nbytes), time.perf_counter() - start))
        return result

    def total_seconds(self) -> float:
        """Seconds in communication calls, waiting included."""
        return sum(seconds for _, _, seconds in self.records)

    def communication_and_waiting(self, first: int = 0) -> tuple[float, float]:
        """(seconds moving data, seconds waiting) of records[first:] - e.g. one step's, with
        `first` = len(records) before the step."""
        records = self.records[first:]
        waiting = sum(seconds for name, _, seconds in records if name == WAITING)
        return sum(seconds for _, _, seconds in records) - waiting, waiting

    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes, _ in self.records)


@dataclasses.dataclass
class StepTimes:
    """One rank's seconds per training step, split three ways (chapter 9's stacked bars):

    - waiting: blocked until other ranks arrive (a Barrier before a collective, a Probe
      before a receive) - load imbalance and pipeline bubbles;
    - communication: inside MPI calls once the peers are there - moving the data;
    - compute: everything else in the step (the model's own functions, the optimiser, Python).
    """

    rows: list = dataclasses.field(default_factory=list)

    def add(self, step_seconds: float, communication: float, waiting: float) -> None:
        self.rows.append((step_seconds, communication, waiting))

    def total(self) -> dict[str, float]:
        """Seconds of each part, summed over every step."""
        if not self.rows:
            raise ValueError("StepTimes.total: no steps were recorded")
        step, communication, waiting = np.sum(np.array(self.rows), axis=0).tolist()
        return {"compute": step - communication - waiting, "communication": communication,
                "waiting": waiting}

    def mean(self, skip_first: bool = True) -> dict[str, float]:
        """Mean seconds per step of each part; the first step (warm-up: page faults, BLAS
        buffers) is left out when there are others."""
        rows = self.rows[1:] if skip_first and len(self.rows) > 1 else self.rows
        if not rows:
            raise ValueError("StepTimes.mean: no steps were recorded")
        step, communication, waiting = np.mean(np.array(rows), axis=0).tolist()
        return {"compute": step - communication - waiting, "communication": communication,
                "waiting": waiting}


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
    parser = argparse.ArgumentParser(prog="python -m tfcourse.parallel.comm")
    add_json_argument(parser)
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
