"""Rank-side helpers shared by every MPI program of the course.

Only programs started by `mpiexec` import this module (it initialises MPI); notebooks use
`tfcourse.launch` instead.
"""

from __future__ import annotations

import argparse

from mpi4py import MPI


def print_in_rank_order(comm: MPI.Comm, line: str) -> list[str] | None:
    """Gather one line per rank to rank 0 and print them there, ordered by rank.

    MPICH interleaves ranks' direct prints mid-line; printing only on rank 0 keeps the
    output deterministic. Returns the lines on rank 0, None elsewhere.
    """
    lines = comm.gather(line, root=0)
    if comm.rank == 0:
        print("\n".join(lines), flush=True)
    return lines


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """The `--json PATH` option every MPI program offers (rank 0 writes it atomically)."""
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="write the result as JSON (rank 0 only)"
    )
