"""Chapter 9: two kinds of parallelism at once - data parallelism over pipelines or over
tensor-parallel groups.

    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.hybrid --dp 2 --pp 2 --config tiny \\
        --layers 4 --microbatches 2 --schedule 1f1b --steps 20
    mpiexec -n 4 python -m mpi4py -m tfcourse.parallel.hybrid --dp 2 --tp 2 --config tiny

The world's dp * inner ranks (inner = pp or tp) form a grid: rank = replica * inner + part.
`comm.Split` makes two families of sub-communicators:

- a *model* communicator per replica (the ranks with the same `replica`): one whole model,
  cut into pipeline stages or tensor-parallel shards exactly as in chapter 7;
- a *data* communicator per part (the ranks with the same `part`): the ranks holding the
  same piece of the model in different replicas, which all-reduce that piece's gradients as
  in chapter 6.

Replica r trains on rows batch_rows(B, r, dp) of every global batch. Its gradients are
weighted by its share of the batch, so the data all-reduce gives the full-batch gradient of
the serial model, and the loss curve equals serial training's to rounding. Nothing here is a
new layer: the step is chapter 7's step functions with chapter 6's all-reduce in the middle.
(Pipeline and tensor parallelism together - "3D" with data parallelism - is what chapter 10's
planner reasons about; it is not implemented here.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from mpi4py import MPI

from tfcourse.data import lm_batch
from tfcourse.nn.model import init_params
from tfcourse.nn.optim import adamw_init, state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel import pipeline_parallel as pipeline
from tfcourse.parallel import tensor_parallel as tensor
from tfcourse.parallel.comm import (
    CommLog,
    StepTimes,
    add_json_argument,
    program_parser,
    run_program,
)
from tfcourse.parallel.data_parallel import average_gradients
from tfcourse.parallel.partition import (
    SCHEDULES,
    batch_rows,
    check_world_size,
    microbatch_rows,
    schedule,
    shard_params,
    stage_layers,
)
from tfcourse.train import (
    TrainingSetup,
    optimizer_update,
    training_setup,
)

# --------------------------------------------------------------------------- the grid


def grid_shape(world_size: int, dp: int, pp: int, tp: int) -> tuple[int, int]:
    """(replicas, ranks per replica) of a dp x pp or dp x tp grid; ValueError naming the flag
    if the product is not the world size or both pp and tp exceed 1."""
    for flag, value in (("--dp", dp), ("--pp", pp), ("--tp", tp)):
        require_positive_int(flag, value)
    if pp > 1 and tp > 1:
        raise ValueError(f"--pp/--tp: this program combines data parallelism with ONE model "
                         f"split; got --pp {pp} and --tp {tp} (see chapter 10's planner)")
    if dp * pp * tp != world_size:
        raise ValueError(f"--dp/--pp/--tp: expected dp * pp * tp = the {world_size} MPI "
                         f"rank(s), got {dp} * {pp} * {tp} = {dp * pp * tp}")
    return dp, pp * tp


def split(comm, ranks_per_replica: int):
    """(replica index, model communicator, data communicator) for this rank."""
    replica, part = divmod(comm.rank, ranks_per_replica)
    model = comm.Split(color=replica, key=part)
    data = comm.Split(color=part, key=replica)
    return replica, model, data


# --------------------------------------------------------------------------- one step


def pipeline_step(stage, ops, x, y, weight: float, step: int, settings, config, model, data,
                  log, data_log: CommLog) -> float:
    """Chapter 7's pipeline step on this replica's rows (x, y), with the stage's gradients
    summed over replicas (weighted by each replica's share of the batch) before the update."""
    loss, grads, _ = pipeline.run_schedule(stage, ops, x, y, config, model, log)
    grads = average_gradients(grads, weight, [list(grads)], data, "mpi", data_log)
    loss = data.allreduce(loss * weight, op=MPI.SUM)  # 0.0 except on the last stages
    return pipeline.finish_step(stage, loss, grads, step, settings, model, log)


def tensor_step(local: dict, opt_state: dict, x, y, weight: float, step: int, settings, config,
                model, data, log: CommLog) -> tuple[float, dict, dict, dict]:
    """Chapter 7's tensor-parallel step on this replica's rows, with every shard's gradient
    summed over replicas; returns (loss, shards, optimiser state, gradients)."""
    loss, grads = tensor.tp_loss_and_grads(local, x, y, config, model, log)
    grads = average_gradients(grads, weight, [list(grads)], data, "mpi", log)
    loss = data.allreduce(loss * weight, op=MPI.SUM)
    norm = tensor.global_grad_norm(grads, model)
    local, opt_state, _ = optimizer_update(local, grads, opt_state, settings, step, norm)
    return loss, local, opt_state, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see comm.agree_on_arguments)."""
    require_positive_int("--threads", args.threads)
    require_positive_int("--microbatches", args.microbatches)
    dp, _ = grid_shape(world_size, args.dp, args.pp, args.tp)
    setup = training_setup(args)
    batch = setup.settings.batch_size
    batch_rows(batch, 0, dp)  # every replica needs at least one row
    if args.pp > 1:
        stage_layers(setup.config.n_layers, args.pp)
        microbatch_rows(batch // dp, args.microbatches)  # the smallest replica's rows
    check_world_size(setup.config, args.tp)
    return setup


def run(args: argparse.Namespace, setup: TrainingSetup, comm) -> dict:
    corpus, config, settings = setup.corpus, setup.config, setup.settings
    dp, per_replica = grid_shape(comm.size, args.dp, args.pp, args.tp)
    replica, model, data = split(comm, per_replica)
    if args.pp > 1:
        stage = pipeline.start(config, settings, model)
        ops = schedule(args.schedule, args.pp, model.rank, args.microbatches)
    else:
        local = shard_params(init_params(config, settings.seed), model.rank, model.size)
        opt_state = adamw_init(local)
    log = CommLog(split_waiting=True)  # this rank's collectives, in both communicators
    losses, step_seconds, times = [], [], StepTimes()
    for step in range(settings.steps):
        x, y = lm_batch(corpus.ids, settings.batch_size, settings.seq_len, settings.seed, step)
        lo, hi = batch_rows(len(x), replica, dp)
        weight = (hi - lo) / len(x)
        comm.Barrier()  # time each step from a common start
        started, first_record = time.perf_counter(), len(log.records)
        if args.pp > 1:  # the pipeline's own messages are in its event log
            events = pipeline.EventLog(started)
            loss = pipeline_step(stage, ops, x[lo:hi], y[lo:hi], weight, step, settings,
                                 config, model, data, events, log)
            communication, waiting = pipeline.communication_and_waiting(events.events)
        else:
            loss, local, opt_state, grads = tensor_step(local, opt_state, x[lo:hi], y[lo:hi],
                                                        weight, step, settings, config, model,
                                                        data, log)
            communication = waiting = 0.0
        step_seconds.append(time.perf_counter() - started)
        logged, logged_waiting = log.communication_and_waiting(first_record)
        times.add(step_seconds[-1], communication + logged, waiting + logged_waiting)
        losses.append(loss)
    if args.pp > 1:  # a gradient per parameter, of the same size
        memory = state_nbytes(stage.params, stage.params, stage.opt_state)
    else:
        memory = state_nbytes(local, grads, opt_state)
    per_rank = comm.gather({"memory": memory, "times": times.mean()}, root=0)
    model.Free()
    data.Free()
    if comm.rank != 0:
        return {}
    return {
        "losses": losses,
        "world_size": comm.size,
        "dp": args.dp,
        "pp": args.pp,
        "tp": args.tp,
        "microbatches": args.microbatches if args.pp > 1 else None,
        "schedule": args.schedule if args.pp > 1 else None,
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "step_seconds": step_seconds,
        "memory_bytes": [r["memory"] for r in per_rank],
        "seconds_per_step_per_rank": [r["times"] for r in per_rank],
        "tokens_per_s": settings.batch_size * settings.seq_len / float(np.median(step_seconds)),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.hybrid", __doc__)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches (with --pp)")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    add_json_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def summary(result: dict) -> str:
        inner = f"pipeline {args.pp} stages" if args.pp > 1 else f"tensor parallel {args.tp}"
        return (f"hybrid: {args.dp} data-parallel replica(s) x {inner}: final loss "
                f"{result['losses'][-1]:.4f} after {len(result['losses'])} steps")

    return run_program(args, prepare, run, summary)


if __name__ == "__main__":
    sys.exit(main())
