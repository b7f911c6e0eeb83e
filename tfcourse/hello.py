"""MPI hello world: `mpiexec -n 4 python -m tfcourse.hello`.

Every rank reports who and where it is; rank 0 prints one line per rank, in rank order.
Two flags show what failure looks like (used by the tests and chapter 0):
`--raise-on-rank R` makes rank R raise, `--hang-on-rank R` makes rank R never reach
the gather, so the other ranks wait forever - a deadlock that only a timeout ends.
"""

from __future__ import annotations

import argparse
import socket
import time

from mpi4py import MPI

from tfcourse.files import write_json_atomic
from tfcourse.parallel.comm import add_json_argument, print_in_rank_order


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
    parser = argparse.ArgumentParser(prog="python -m tfcourse.hello", description=__doc__)
    add_json_argument(parser)
    parser.add_argument("--raise-on-rank", type=int, default=None, metavar="R")
    parser.add_argument("--hang-on-rank", type=int, default=None, metavar="R")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    info = rank_info(comm)
    if args.raise_on_rank == comm.rank:
        raise RuntimeError(f"rank {comm.rank} failed on purpose (--raise-on-rank {comm.rank})")
    if args.hang_on_rank == comm.rank:
        while True:  # never reaches the gather below: every other rank waits for it
            time.sleep(1.0)
    print_in_rank_order(comm, format_rank_line(info))
    infos = comm.gather(info, root=0)
    if comm.rank == 0 and args.json:
        write_json_atomic(args.json, {"world_size": comm.size, "ranks": infos})


if __name__ == "__main__":
    main()
