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
import functools
import sys

from mpi4py import MPI

from tfcourse.nn.optim import state_nbytes
from tfcourse.nn.validate import require_positive_int
from tfcourse.parallel import pipeline_parallel as pipeline
from tfcourse.parallel import tensor_parallel as tensor
from tfcourse.parallel.checkpointing import start_training
from tfcourse.parallel.data_parallel import average_gradients
from tfcourse.parallel.plans import placement
from tfcourse.parallel.plans.batches import batch_rows
from tfcourse.parallel.plans.pipeline import SCHEDULES, microbatch_rows, schedule, stage_layers
from tfcourse.parallel.plans.tensor import check_world_size
from tfcourse.parallel.program import State, program_parser, result_record, run_program, train
from tfcourse.train import TrainingSetup, training_setup

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


@dataclasses.dataclass(frozen=True)
class Hybrid:
    """What every step of this run shares: the grid, both communicators, the inner split."""

    config: object
    settings: object
    dp: int
    replica: int
    model: object  # this replica's ranks: pipeline stages or tensor-parallel shards
    data: object  # the ranks holding the same part of the model in every replica
    stage: pipeline.Stage | None  # with --pp
    ops: list | None  # this stage's schedule, with --pp


def replica_grads(state: State, x, y, log, hy: Hybrid):
    """This replica's loss and gradients on its rows, by chapter 7's pipeline or tensor-
    parallel model, then summed over replicas (each weighted by its share of the batch) by
    chapter 6's all-reduce; returns (loss, grads)."""
    lo, hi = batch_rows(len(x), hy.replica, hy.dp)
    weight = (hi - lo) / len(x)
    if hy.stage is not None:
        loss, grads, _ = pipeline.run_schedule(hy.stage, state.params, hy.ops, x[lo:hi],
                                               y[lo:hi], hy.config, hy.model, log)
    else:
        loss, grads = tensor.tp_loss_and_grads(state.params, x[lo:hi], y[lo:hi], hy.config,
                                               hy.model, log)
    grads = average_gradients(grads, weight, [list(grads)], hy.data, "mpi", log)
    return hy.data.allreduce(loss * weight, op=MPI.SUM), grads  # PP: 0.0 but on last stages


def train_step(state: State, x, y, step: int, log, hy: Hybrid):
    """One step of the grid; the update is the inner split's own."""
    loss, grads = replica_grads(state, x, y, log, hy)
    if hy.stage is not None:
        state, loss = pipeline.finish_step(state, loss, grads, step, hy.settings, hy.model, log)
        return state, loss, grads
    return tensor.tp_update(state, grads, step, hy.settings, hy.model), loss, grads


# --------------------------------------------------------------------------- program


def prepare(args: argparse.Namespace, world_size: int) -> TrainingSetup:
    """Check every argument against `world_size` without any communication; ValueError
    naming the argument on bad input (see program.agree_on_arguments)."""
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
    config, settings = setup.config, setup.settings
    dp, per_replica = grid_shape(comm.size, args.dp, args.pp, args.tp)
    replica, model, data = split(comm, per_replica)
    if args.pp > 1:
        stage, part = pipeline.start(config, model)
        ops = schedule(args.schedule, args.pp, model.rank, args.microbatches)
    else:
        stage, ops, part = None, None, placement.tensor(model.rank, model.size)
    state, saving = start_training(comm, args, setup, placement.in_replica(part, replica), {
        "program": "hybrid", "dp": args.dp, "pp": args.pp, "tp": args.tp})
    hy = Hybrid(config, settings, dp, replica, model, data, stage, ops)
    result = train(comm, setup, state, functools.partial(train_step, hy=hy),
                   split_waiting=True,  # this rank's collectives, in both communicators
                   saving=saving)
    record = result_record(result, setup, comm, state_nbytes(
        result.state.params, result.grads, result.state.opt_state),
        dp=args.dp, pp=args.pp, tp=args.tp,
        microbatches=args.microbatches if args.pp > 1 else None,
        schedule=args.schedule if args.pp > 1 else None)
    model.Free()
    data.Free()
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = program_parser("tfcourse.parallel.hybrid", __doc__)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches (with --pp)")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
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
