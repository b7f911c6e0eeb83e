"""Run a learner's version of one of the course's MPI functions for real, under mpiexec, and
compare it with the library's (issue 18: the learner writes the algorithms).

    mpiexec -n 3 python -m mpi4py -m tfcourse.parallel.learner ring_reduce_scatter my_ring.py

`my_ring.py` defines a function with the library function's name and signature. Every rank
runs it on the same inputs as the library function and compares (learner_cases: buffer for
buffer, and for a ring the messages each rank sends, p - 1 steps); then the program that uses
the function runs with the learner's in the library's place and is compared with its serial
reference: data-parallel, ZeRO-1, tensor-parallel, pipeline or context-parallel (Ulysses)
training against serial training, ring attention against full attention, the master/worker
task graph against a serial run (1F1B and ZB-H1 schedules: pipeline training with the
learner's list for that --schedule); ZeRO-3's hooks also have their memory and prefetch
watched (learner_zero3), a schedule that differs is measured - peak in flight, simulated
bubble (learner_schedules); Ulysses' kernel is compared slice by slice with the serial
attention over the whole sequence (learner_ulysses).
Rank 0 prints one line and writes --json: {"ok", "problem"}.
Start it with `python -m tfcourse.check NAME FILE` (all rank counts, one command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from tfcourse.files import write_json_atomic
from tfcourse.nn.model import preset
from tfcourse.parallel import comm as collectives
from tfcourse.parallel.learner_cases import CHECKS
from tfcourse.parallel.program import agree_on_arguments, program_parser


def load_function(name: str, path: str):
    """The function `name` that the learner's file defines (ValueError naming the file)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"FILE: no file at {path!r}")
    namespace = {"__name__": "learner"}
    try:
        exec(compile(source.read_text(), str(source), "exec"), namespace)
    except Exception as err:  # noqa: BLE001 - any error in the learner's file is reported
        raise ValueError(f"FILE: {path!r} does not run: {type(err).__name__}: {err}") from None
    fn = namespace.get(name)
    if not callable(fn):
        raise ValueError(f"FILE: {path!r} defines no function {name!r}")
    return fn


def training_equals_serial(module: str, flags: list[str], comm) -> str | None:
    """Train `module` (3 steps of the tiny model) and compare its losses with serial training."""
    import importlib

    from tfcourse import train

    program = importlib.import_module(module)
    args = program.parse_args(["--config", "tiny", "--steps", "3", "--batch-size", "6", *flags])
    setup = program.prepare(args, comm.size)
    losses = program.run(args, setup, comm)["losses"]
    if comm.rank != 0:
        return None
    serial = train.train_lm(setup.config, setup.corpus, setup.settings, progress="none")["losses"]
    if not np.allclose(losses, serial, rtol=1e-10, atol=0):
        return (f"training with it gives losses {np.round(losses, 6).tolist()}, serial "
                f"training {np.round(serial, 6).tolist()}")
    return None


def attention_equals_full(comm) -> str | None:
    """Ring attention (forward and backward, causal, uneven chunks) against full attention."""
    from tfcourse.parallel import sequence_parallel

    args = sequence_parallel.parse_args(["--seq-len", str(4 * comm.size + 3)])
    result = sequence_parallel.run(args, sequence_parallel.prepare(args, comm.size), comm)
    if comm.rank == 0 and max(result["max_abs_err_out"], result["max_abs_err_grad"]) > 1e-10:
        return (f"ring attention with it differs from full attention by "
                f"{result['max_abs_err_out']:.3g} (output), {result['max_abs_err_grad']:.3g} "
                f"(gradients)")
    return None


def tasks_equal_serial(fn, comm) -> str | None:
    """Chapter 8's task graph (tokenise -> train -> evaluate -> select) with the learner's
    master on rank 0 and the library's workers, against a serial run."""
    from tfcourse.parallel import task_parallel
    from tfcourse.parallel.plans.tasks import graph_tasks, run_serial

    tasks = graph_tasks([0.01, 0.03], steps=2)
    t0 = comm.bcast(time.time(), root=0)
    if comm.rank != 0:
        return task_parallel.worker(comm, t0)
    got, want = fn(tasks, comm, t0)[tasks[-1]["id"]], run_serial(tasks)[tasks[-1]["id"]]
    if got.get("result") != want.get("result"):
        return (f"the task graph's selection with it is {got.get('result', got.get('error'))}, "
                f"a serial run's {want['result']}")
    return None


def tensor_parallel_fits(world_size: int) -> bool:
    """Whether the tiny model's heads and feed-forward columns split over `world_size` ranks."""
    from tfcourse.parallel.plans.tensor import check_world_size

    try:
        check_world_size(preset("tiny", vocab_size=1), world_size)
    except ValueError:
        return False
    return True


LEARNED_SCHEDULES = {"schedule_1f1b": "1f1b", "schedule_zb_h1": "zb-h1"}  # name: its --schedule


def in_its_program(name: str, fn, comm) -> str | None:
    """Put the learner's function where the library's is looked up, then run the program
    that uses it against its serial reference."""
    from tfcourse.parallel import (
        context_parallel,
        data_parallel,
        pipeline_parallel,
        sequence_parallel,
        tensor_parallel,
        zero3,
    )

    if name in LEARNED_SCHEDULES:  # the learner's list for its kind, the library's for others
        learned, library = LEARNED_SCHEDULES[name], pipeline_parallel.schedule
        pipeline_parallel.schedule = lambda kind, p, stage, m, v=1: (
            [tuple(op) for op in fn(p, stage, m)] if kind == learned
            else library(kind, p, stage, m, v))
        return training_equals_serial("tfcourse.parallel.pipeline_parallel", [
            "--schedule", learned, "--microbatches", "3", "--layers", "4"], comm)
    if name == "broadcast_from_owners":  # the library's also takes the EventLog
        data_parallel.broadcast_from_owners = lambda params, owners, c, log: fn(params,
                                                                                 owners, c)
        return training_equals_serial("tfcourse.parallel.data_parallel", ["--zero", "1"], comm)
    if name == "zero3_hooks":  # zero3_step looks its hooks up in zero3
        zero3.zero3_hooks = fn
        return training_equals_serial("tfcourse.parallel.data_parallel", ["--zero", "3"], comm)
    if name == "megatron_ops":  # the library's also takes the EventLog
        tensor_parallel.megatron_ops = lambda c, log: fn(c)
        if not tensor_parallel_fits(comm.size):
            return None  # the tiny model's 4 heads do not split over 3 ranks
        return training_equals_serial("tfcourse.parallel.tensor_parallel", [], comm)
    if name == "ulysses_attention":  # train_step looks its kernel up in context_parallel
        context_parallel.ulysses_attention = lambda c, log: fn(c)  # no log: no bytes counted
        if preset("tiny", vocab_size=1).n_heads % comm.size:
            return None  # the tiny model's 4 heads do not split over 3 ranks
        return training_equals_serial("tfcourse.parallel.context_parallel",
                                      ["--train", "--method", "ulysses"], comm)
    if name == "merge_partials":
        sequence_parallel.merge_partials = fn
        return attention_equals_full(comm)
    if name == "master":
        return tasks_equal_serial(fn, comm)
    setattr(collectives, name, fn)  # the ring collectives: ring_allreduce looks them up here
    return training_equals_serial("tfcourse.parallel.data_parallel", ["--allreduce", "ring"],
                                  comm)


def first_failure(comm, cases) -> list[tuple[int, str]]:
    """Run the cases in step on every rank (all ranks agree after each, so none goes on to the
    next collective alone); [(rank, problem), ...] of the first case that failed anywhere."""
    while True:
        try:
            problem = next(cases)
        except StopIteration:
            problem, done = None, True
        except Exception as err:  # noqa: BLE001 - the learner's code failed on this rank
            problem, done = f"raised {type(err).__name__}: {err}", True
        else:
            done = False
        problems = comm.allgather(problem)
        failed = [(rank, p) for rank, p in enumerate(problems) if p]
        if failed or all(comm.allgather(done)):
            return failed


def main(argv=None) -> int:
    parser = program_parser("tfcourse.parallel.learner", __doc__, training=False)
    parser.add_argument("name", choices=sorted(CHECKS))
    parser.add_argument("file")
    args: argparse.Namespace = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    fn = agree_on_arguments(comm, lambda: load_function(args.name, args.file), args.json)
    failed = first_failure(comm, CHECKS[args.name](fn, comm))
    if not failed:
        problems = comm.allgather(in_its_program(args.name, fn, comm))
        failed = [(rank, p) for rank, p in enumerate(problems) if p]
    if comm.rank == 0:
        result = {"ok": not failed, "world_size": comm.size,
                  "problem": f"rank {failed[0][0]}: {failed[0][1]}" if failed else None}
        print(f"{args.name} on {comm.size} rank(s): " + ("equals the library, and its "
              "program runs right with it" if not failed else result["problem"]), flush=True)
        if args.json:
            write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
