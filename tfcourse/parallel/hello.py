"""MPI hello world: `mpiexec -n 4 python -m tfcourse.hello`.

Every rank reports who and where it is; rank 0 prints one line per rank, in rank order.
Three flags show what failure looks like (used by the tests and chapter 0):
`--raise-on-rank R` makes rank R raise; `--kill-on-rank R` makes rank R die at once from
SIGKILL, as if the machine ran out of memory (no traceback, no MPI_Abort: it only says so
on stderr first); `--hang-on-rank R` makes rank R never reach the gather, so the other
ranks wait forever - a deadlock that only a timeout ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from mpi4py import MPI

from tfcourse.files import write_json_atomic
from tfcourse.parallel.program import agree_on_arguments, print_in_rank_order, program_parser

FAULT_FLAGS = ("--raise-on-rank", "--kill-on-rank", "--hang-on-rank")


def rank_info(comm: MPI.Comm) -> dict:
    """This rank's identity: rank, world size, host name and MPI library."""
    return {
        "rank": comm.rank,
        "size": comm.size,
        "host": socket.gethostname(),
        "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
    }


def format_rank_line(info: dict) -> str:
    """'rank 0 of 4 on host vm: MPICH Version: 5.0.2'."""
    return f"rank {info['rank']} of {info['size']} on host {info['host']}: {info['mpi_library']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = program_parser("tfcourse.hello", __doc__, training=False)
    for flag in FAULT_FLAGS:
        parser.add_argument(flag, type=int, default=None, metavar="R")
    return parser.parse_args(argv)


def check_fault_ranks(args: argparse.Namespace, world_size: int) -> None:
    """A fault flag must name an existing rank, or it would silently do nothing."""
    for flag in FAULT_FLAGS:
        rank = getattr(args, flag[2:].replace("-", "_"))
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"{flag}: expected a rank in [0, {world_size}), got {rank}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    agree_on_arguments(comm, lambda: check_fault_ranks(args, comm.size), args.json)
    info = rank_info(comm)
    if args.raise_on_rank == comm.rank:
        raise RuntimeError(f"rank {comm.rank} failed on purpose (--raise-on-rank {comm.rank})")
    if args.kill_on_rank == comm.rank:
        # A killed process cannot explain itself, and MPICH reports only a PID: say it first,
        # as a real program's log would have said what it was doing.
        print(f"rank {comm.rank}: killing itself with SIGKILL (--kill-on-rank {comm.rank})",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # dies here: no cleanup, no MPI_Abort
    if args.hang_on_rank == comm.rank:
        while True:  # never reaches the gather below: every other rank waits for it
            time.sleep(1.0)
    print_in_rank_order(comm, format_rank_line(info))
    infos = comm.gather(info, root=0)
    if comm.rank == 0 and args.json:
        write_json_atomic(args.json, {"world_size": comm.size, "ranks": infos})


if __name__ == "__main__":
    sys.exit(main())
