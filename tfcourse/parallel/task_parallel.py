"""Chapter 8: task parallelism - independent jobs spread over MPI processes.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.task_parallel --mode sweep \\
        --scheduler dynamic --json out.json

Three ways to hand out the tasks of `tfcourse.parallel.plans.tasks`:
- `dynamic`: a hand-written master/worker. Rank 0 sends one task to each worker (tag WORK);
  whenever a result (tag RESULT) comes back it sends that worker the next ready task, until
  none is left (tag STOP). Fast workers simply do more tasks. A task that raises is reported
  back as an error; the master carries on with the others. Dependencies (a task graph) are
  respected: a task is sent as soon as all its inputs exist.
- `static`: tasks dealt round-robin in advance (worker w gets tasks w, w + n, ...). No
  messages while working - and no help for a worker that drew the expensive tasks.
- `futures`: the standard library's executor interface over MPI (mpi4py.futures.
  MPICommExecutor): submit tasks, collect futures.
Whatever the scheduler and the number of ranks, the results equal a serial run's.
"""

from __future__ import annotations

import argparse
import sys
import time

from mpi4py import MPI
from mpi4py.futures import MPICommExecutor

from tfcourse.files import write_json_atomic
from tfcourse.nn.validate import (
    parse_list,
    require_nonnegative_int,
    require_positive_int,
    require_real,
)
from tfcourse.parallel.plans.tasks import (
    dependency_inputs,
    graph_tasks,
    imbalanced_tasks,
    ready_tasks,
    run_serial,
    skipped,
    sweep_tasks,
    timed_task,
)
from tfcourse.parallel.program import (
    agree_on_arguments,
    limit_blas_threads,
    program_parser,
)

WORK, RESULT, STOP = 1, 2, 3
POLL_SECONDS = 0.0005


def wait_for_message(comm, source: int, tag: int, status) -> None:
    """Block until a matching message arrives, sleeping between probes.

    A plain blocking recv in MPICH spins on its core; with more ranks than cores (a master
    and its workers on a laptop) that spinning steals CPU from the ranks doing the work."""
    while not comm.Iprobe(source=source, tag=tag, status=status):
        time.sleep(POLL_SECONDS)


def master(tasks: list[dict], comm, t0: float) -> dict[int, dict]:
    """Dynamic scheduling on rank 0; with no workers it runs everything itself."""
    if comm.size == 1:
        return run_serial(tasks)
    outcomes: dict[int, dict] = {}
    started: set[int] = set()
    idle = list(range(1, comm.size))
    status = MPI.Status()
    while len(outcomes) < len(tasks):
        for task in ready_tasks(tasks, set(outcomes), started):
            inputs, failure = dependency_inputs(task, outcomes)
            if failure:  # never run a task whose input is missing; report why
                outcomes[task["id"]] = skipped(task, failure, t0)
                started.add(task["id"])
            elif idle:
                comm.send((task, inputs), dest=idle.pop(0), tag=WORK)
                started.add(task["id"])
        if len(outcomes) == len(tasks):
            break
        wait_for_message(comm, MPI.ANY_SOURCE, RESULT, status)
        outcome = comm.recv(source=status.Get_source(), tag=RESULT)
        outcomes[outcome["id"]] = outcome
        idle.append(status.Get_source())
    for worker in range(1, comm.size):
        comm.send(None, dest=worker, tag=STOP)
    return outcomes


def worker(comm, t0: float) -> None:
    """Run whatever the master sends until it says STOP."""
    status = MPI.Status()
    while True:
        wait_for_message(comm, 0, MPI.ANY_TAG, status)
        message = comm.recv(source=0, tag=status.Get_tag())
        if status.Get_tag() == STOP:
            return
        task, inputs = message
        comm.send(timed_task(task, inputs, comm.rank, t0), dest=0, tag=RESULT)


def run_static(tasks: list[dict], comm, t0: float) -> dict[int, dict] | None:
    """Round-robin over all ranks (rank 0 works too); results gathered to rank 0."""
    if any(t.get("deps") for t in tasks):
        raise ValueError("scheduler: 'static' cannot run a task graph (tasks with deps); "
                         "use 'dynamic' or 'futures'")
    mine = [timed_task(t, {}, comm.rank, t0) for t in tasks[comm.rank::comm.size]]
    gathered = comm.gather(mine, root=0)
    if comm.rank != 0:
        return None
    return {o["id"]: o for outcomes in gathered for o in outcomes}


def run_futures(tasks: list[dict], comm, t0: float) -> dict[int, dict] | None:
    """mpi4py.futures: rank 0 submits ready tasks; the other ranks serve as the pool."""
    with MPICommExecutor(comm, root=0) as executor:
        if executor is None:  # a worker rank: it served tasks until the executor closed
            return None
        outcomes: dict[int, dict] = {}
        while len(outcomes) < len(tasks):
            wave = ready_tasks(tasks, set(outcomes), set(outcomes))
            futures = {}
            for task in wave:
                inputs, failure = dependency_inputs(task, outcomes)
                if failure:
                    outcomes[task["id"]] = skipped(task, failure, t0)
                else:
                    futures[task["id"]] = executor.submit(timed_on_this_rank, task, inputs, t0)
            for task_id, future in futures.items():
                outcomes[task_id] = future.result()
        return outcomes


def timed_on_this_rank(task: dict, inputs: dict, t0: float) -> dict:
    """What a futures worker runs: the task, labelled with the rank that ran it."""
    return timed_task(task, inputs, MPI.COMM_WORLD.Get_rank(), t0)


SCHEDULERS = {"dynamic": None, "static": run_static, "futures": run_futures}


def make_tasks(args) -> list[dict]:
    """The tasks the command line asks for; ValueError naming the flag on bad input."""
    require_positive_int("--steps", args.steps)
    lrs = parse_list("--lrs", args.lrs, float, lambda f, v: require_real(f, v, positive=True))
    if args.mode == "sweep":
        seeds = parse_list("--seeds", args.seeds, int, require_nonnegative_int)
        tasks = sweep_tasks(lrs, seeds, args.steps)
    elif args.mode == "graph":
        tasks = graph_tasks(lrs, args.steps)
    else:
        tasks = imbalanced_tasks(parse_list("--costs", args.costs, int, require_positive_int))
    if args.scheduler == "static" and any(t.get("deps") for t in tasks):
        raise ValueError("--scheduler: 'static' cannot run a task graph (tasks with deps); "
                         "use 'dynamic' or 'futures'")
    if args.fail_task is not None:
        if not 0 <= args.fail_task < len(tasks):
            raise ValueError(f"--fail-task: expected a task id in [0, {len(tasks)}), "
                             f"got {args.fail_task}")
        tasks[args.fail_task] = {**tasks[args.fail_task], "kind": "fail"}
    return tasks


def prepare(args: argparse.Namespace) -> list[dict]:
    """Check every argument without any communication (see program.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    return make_tasks(args)


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.task_parallel", __doc__, training=False)
    parser.add_argument("--mode", default="sweep", choices=["sweep", "graph", "imbalance"])
    parser.add_argument("--scheduler", default="dynamic", choices=sorted(SCHEDULERS))
    parser.add_argument("--lrs", default="0.003,0.01,0.03", help="learning rates to sweep")
    parser.add_argument("--seeds", default="0,1", help="seeds to sweep")
    parser.add_argument("--steps", type=int, default=30, help="training steps per task")
    parser.add_argument("--costs", default="6,1,6,1,6,1,6,1",
                        help="relative task costs for --mode imbalance")
    parser.add_argument("--fail-task", type=int, default=None, metavar="ID",
                        help="make this task raise, to see failures reported")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per rank")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    tasks = agree_on_arguments(comm, lambda: prepare(args), args.json)
    _blas = limit_blas_threads(args.threads)  # noqa: F841 - keeps the limit for the run
    t0 = comm.bcast(time.time(), root=0)  # one clock origin for every rank's timeline
    if args.scheduler == "dynamic":
        outcomes = master(tasks, comm, t0) if comm.rank == 0 else worker(comm, t0)
    else:
        outcomes = SCHEDULERS[args.scheduler](tasks, comm, t0)
    if comm.rank == 0:
        ordered = [outcomes[t["id"]] for t in tasks]
        errors = [o for o in ordered if "error" in o]
        for outcome in ordered:  # trained weights travel between tasks, not into the report
            if outcome.get("result"):
                outcome["result"].pop("params", None)
        print(f"{len(ordered)} tasks on {comm.size} rank(s), scheduler {args.scheduler}: "
              f"{len(ordered) - len(errors)} succeeded, {len(errors)} failed")
        if args.json:
            write_json_atomic(args.json, {
                "mode": args.mode, "scheduler": args.scheduler, "world_size": comm.size,
                "tasks": tasks, "outcomes": ordered, "errors": errors,
                "makespan": max(o["end"] for o in ordered)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
